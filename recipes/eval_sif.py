"""Evaluate a SIF model on a held-out split: accuracy by question type, grounding IoU, format and depth rates.

    python recipes/eval_sif.py --model.path runs/grpo-tiny/hf            # bundled held-out scenes
    torchrun --nproc_per_node=2 recipes/eval_sif.py --model.path runs/grpo-tiny/hf --eval.focus_mode crop
    python recipes/eval_sif.py --model.path /ckpt --data.eval_path /data/spatialbench/records.jsonl

Greedy decoding by default. Per record: the answer score (``engine.data.answers.answers_match``; a ``box``
answer counts as correct at IoU ≥ 0.5), a **missing or malformed answer counts as wrong** (the release counted
it as correct on two benchmarks), the format reward (strict grammar), the grounding IoU of the last area with the
ground truth (mean of union-region and Hungarian IoU; 0 without an area) and the depth reward. Records are split
over ranks and gathered; rank 0 prints a table and writes ``<output>/eval.json``.
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
import torch.distributed as dist
from common import load_split, resolve_checkpoint

from engine.config import DataConfig, ModelConfig, load_config
from engine.distributed import DistEnv, init_distributed
from engine.models import from_pretrained, processor_from_pretrained
from engine.rl.grpo import RLConfig
from engine.rl.iou import box_set_iou
from engine.rl.prompts import build_prompt
from engine.rl.rewards import answer_score, format_reward, score_completions
from engine.rl.rollout import generate_rollouts

BOX_CORRECT_IOU = 0.5


@dataclass
class EvalSection:
    """How to decode: focusing mode, length, batch of prompts per generate call, sampling temperature (0 greedy)."""

    focus_mode: Literal["text", "crop"] = "text"
    prompt_depth_image: bool | None = None
    max_new_tokens: int = 1024
    batch_size: int = 8
    temperature: float = 0.0
    max_views: int = 4
    crop_size: int = 112
    output: str = "runs/eval"


@dataclass
class EvalRecipeConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=lambda: DataConfig(max_pixels=224 * 224))
    eval: EvalSection = field(default_factory=EvalSection)
    output_dir: str = "runs"


def evaluate_records(model, processor, records, cfg: EvalSection) -> list[dict]:
    """Per-record results: id, qtype, correct (0/1), score, format, iou, depth, answer (or None)."""
    rl = RLConfig(
        temperature=cfg.temperature,
        max_completion_length=cfg.max_new_tokens,
        focus_mode=cfg.focus_mode,
        prompt_depth_image=cfg.prompt_depth_image,
        max_views=cfg.max_views,
        crop_size=cfg.crop_size,
    )
    rows = []
    for start in range(0, len(records), cfg.batch_size):
        chunk = records[start : start + cfg.batch_size]
        prompts = [build_prompt(r, processor, with_depth=rl.depth_in_prompt) for r in chunk]
        with torch.no_grad():
            batch = generate_rollouts(model, processor, prompts, rl, num_samples=1)
        rewards = score_completions(batch.texts, batch.prompt_index, [p.target for p in prompts])
        for i, (p, parsed) in enumerate(zip(prompts, rewards.parsed)):
            score = answer_score(parsed.answer, p.target)
            correct = score >= BOX_CORRECT_IOU if p.record.answer_type == "box" else score >= 1.0
            iou = box_set_iou([b[:4] for b in parsed.areas[-1]], p.target.gt_boxes) if parsed.areas else 0.0
            rows.append(
                {
                    "id": p.record.id,
                    "qtype": p.record.qtype or p.record.answer_type,
                    "correct": float(correct),
                    "score": score,
                    "format": format_reward(parsed),
                    "iou": iou,
                    "depth": float(rewards.terms["depth"][i]),
                    "answer": parsed.answer,
                }
            )
    return rows


def summarise(rows: list[dict]) -> dict:
    by_type: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        by_type[r["qtype"]].append(r)

    def mean(part: list[dict], key: str) -> float:
        return sum(r[key] for r in part) / len(part) if part else 0.0

    return {
        "num_records": len(rows),
        "accuracy": mean(rows, "correct"),
        "format_rate": mean(rows, "format"),
        "iou": mean(rows, "iou"),
        "depth": mean(rows, "depth"),
        "answered": sum(r["answer"] is not None for r in rows) / max(len(rows), 1),
        "by_qtype": {
            q: {"n": len(p), "accuracy": mean(p, "correct"), "iou": mean(p, "iou")} for q, p in sorted(by_type.items())
        },
    }


def main(argv: list[str] | None = None) -> dict:
    cfg = load_config(EvalRecipeConfig(), sys.argv[1:] if argv is None else argv)
    with init_distributed() as env:
        return run(cfg, env)


def run(cfg: EvalRecipeConfig, env: DistEnv) -> dict:
    """Evaluate in an initialised process group; rank 0 prints the table and writes eval.json."""
    checkpoint = resolve_checkpoint(cfg.model.path, cfg.output_dir, env)
    # the checkpoint's dtype (bf16 exports) on GPU; fp32 on the CPU, where bf16 matmuls are slow and less exact
    dtype = None if env.device.type == "cuda" else torch.float32
    model = from_pretrained(checkpoint, dtype=dtype, device=env.device).eval()
    processor = processor_from_pretrained(checkpoint)
    processor.image.min_pixels, processor.image.max_pixels = cfg.data.min_pixels, cfg.data.max_pixels
    records = load_split(cfg.data.eval_path, "heldout", cfg.data.limit)
    rows = evaluate_records(model, processor, records[env.rank :: env.world_size], cfg.eval)
    if env.world_size > 1:
        gathered: list = [None] * env.world_size
        dist.all_gather_object(gathered, rows)
        rows = [r for part in gathered for r in part]
    summary = summarise(rows)
    if env.is_main:
        out = Path(cfg.eval.output)
        out.mkdir(parents=True, exist_ok=True)
        (out / "eval.json").write_text(json.dumps({"summary": summary, "records": rows}, indent=2) + "\n")
        print(f"[eval] {checkpoint} on {summary['num_records']} records ({cfg.eval.focus_mode} mode)")
        print(
            f"  accuracy {summary['accuracy']:.3f}  format {summary['format_rate']:.3f}  "
            f"IoU {summary['iou']:.3f}  depth {summary['depth']:.3f}  answered {summary['answered']:.3f}"
        )
        print(f"  {'qtype':<16} {'n':>4} {'acc':>6} {'IoU':>6}")
        for q, s in summary["by_qtype"].items():
            print(f"  {q:<16} {s['n']:>4} {s['accuracy']:>6.3f} {s['iou']:>6.3f}")
    return summary


if __name__ == "__main__":
    main()
