"""The evaluation job (``recipes/eval_sif.py``): a SIF model on a held-out split, accuracy by question type
beside chance and the majority answer, grounding IoU of the last area, format and depth rates, and the
distribution of the predicted answers.

Greedy decoding by default; the scoring rules are ``engine.rl.evaluation``'s (the same code the SFT and GRPO
jobs end with). Records are split over ranks and gathered; rank 0 prints the table and writes
``<eval.output>/eval.json`` and ``eval.png``.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

import torch

from engine.config import DataConfig, ModelSection, exit_on_config_error, load_config
from engine.distributed import DistEnv, init_distributed
from engine.models import from_pretrained, processor_from_pretrained
from engine.recipes.policy import resolve_checkpoint
from engine.recipes.splits import load_split
from engine.rl.evaluation import EvalConfig, evaluate, format_summary, plot_eval, summarise, write_eval


@dataclass
class EvalSection(EvalConfig):
    """Decoding settings (``engine.rl.evaluation.EvalConfig``) and the folder for eval.json / eval.png."""

    output: str = "runs/eval"


@dataclass
class EvalRecipeConfig:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataConfig = field(default_factory=lambda: DataConfig(max_pixels=224 * 224))
    eval: EvalSection = field(default_factory=EvalSection)
    output_dir: str = "runs"


@exit_on_config_error
def main(argv: list[str] | None = None) -> dict:
    cfg = load_config(EvalRecipeConfig(), sys.argv[1:] if argv is None else argv)
    with init_distributed() as env:
        return run(cfg, env)


def run(cfg: EvalRecipeConfig, env: DistEnv) -> dict:
    """Evaluate in an initialised process group; rank 0 prints the table and writes eval.json and eval.png."""
    checkpoint = resolve_checkpoint(cfg.model, cfg.output_dir, env)
    # the checkpoint's dtype (bf16 exports) on GPU; fp32 on the CPU, where bf16 matmuls are slow and less exact
    dtype = None if env.device.type == "cuda" else torch.float32
    model = from_pretrained(checkpoint, dtype=dtype, device=env.device).eval()
    processor = processor_from_pretrained(checkpoint)
    processor.image.min_pixels, processor.image.max_pixels = cfg.data.min_pixels, cfg.data.max_pixels
    records = load_split(cfg.data.eval_path, "heldout", cfg.data.limit)
    rows = evaluate(model, processor, records, cfg.eval, rank=env.rank, world_size=env.world_size)
    summary = summarise(rows)
    if env.is_main:
        name = str(checkpoint)
        write_eval(f"{cfg.eval.output}/eval.json", {name: summary}, {name: rows})
        plot_eval({name: summary}, f"{cfg.eval.output}/eval.png")
        print(format_summary(summary, f"{checkpoint} ({cfg.eval.focus_mode} mode)"), flush=True)
    return summary


if __name__ == "__main__":
    main()
