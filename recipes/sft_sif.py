"""SFT on SIF traces: teach the model the interleaved <area>/<text> chain of thought before GRPO-SIF.

    python recipes/sft_sif.py                                  # tiny embedded default on the bundled scenes
    torchrun --nproc_per_node=2 recipes/sft_sif.py --train.max_steps 50
    torchrun --nproc_per_node=8 recipes/sft_sif.py --config recipes/configs/sft_qwen2_5_vl_7b.toml \\
        --model.path /ckpt/Qwen2.5-VL-7B-Instruct --data.path /data/sif50k/records.jsonl

Every field of ``SFTRecipeConfig`` can be overridden as ``--section.key value``. The loss is the token mean of
the cross-entropy on assistant tokens over the whole global batch. ``--views.focus_mode crop`` inserts the crop
views after every ``</area>``, as a crop-mode rollout sees them (view tokens are not scored). Outputs:
``runs/<run_name>/metrics.jsonl``, ``curves.png``, DCP checkpoints and the merged HF export in ``hf/`` (what
``recipes/grpo_sif.py`` starts from).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from functools import partial

from common import hf_exporter, load_policy, load_split, resolve_checkpoint, window_means

from engine.config import DataConfig, LoRAConfig, ModelConfig, TrainConfig, load_config, to_dict
from engine.distributed import DistEnv, init_distributed
from engine.train.batch_source import IndexedBatchSource
from engine.train.sft import SFTDataset, SFTObjective, SFTViews, collate_sft
from engine.train.trainer import Trainer, TrainResult


@dataclass
class SFTRecipeConfig:
    """Defaults: the tiny embedded model, full fine-tuning on the bundled synthetic traces: 500 steps of one trace
    per rank (5 epochs on 2 ranks), about 3 minutes on 2 CPU cores. The tiny model's vision tower is randomly
    initialised, so it trains too (``lora.freeze_vision false``); the 7B configs freeze their pretrained one."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=lambda: DataConfig(max_seq_len=2048, max_pixels=224 * 224))
    lora: LoRAConfig = field(default_factory=lambda: LoRAConfig(freeze_vision=False))
    views: SFTViews = field(default_factory=SFTViews)
    train: TrainConfig = field(
        default_factory=lambda: TrainConfig(
            run_name="sft-tiny",
            lr=3e-3,
            warmup_ratio=0.05,
            min_lr_ratio=0.05,
            weight_decay=0.0,
            micro_batch_size=1,
            grad_accum_steps=1,
            max_steps=500,
            export_hf=True,
        )
    )


def main(argv: list[str] | None = None) -> TrainResult:
    cfg = load_config(SFTRecipeConfig(), sys.argv[1:] if argv is None else argv)
    with init_distributed() as env:
        return run(cfg, env)


def run(cfg: SFTRecipeConfig, env: DistEnv) -> TrainResult:
    """Train with a loaded config in an initialised process group; returns the Trainer's result."""
    checkpoint = resolve_checkpoint(cfg.model.path, cfg.train.output_dir, env)
    model, processor = load_policy(checkpoint, cfg.model, cfg.lora, cfg.data, cfg.train.seed, env, cfg.train)

    records = load_split(cfg.data.path, "train", cfg.data.limit)
    dataset = SFTDataset(
        records, processor, with_depth=cfg.data.with_depth, max_seq_len=cfg.data.max_seq_len, views=cfg.views
    )
    source = IndexedBatchSource(
        dataset,
        micro_batch_size=cfg.train.micro_batch_size,
        grad_accum_steps=cfg.train.grad_accum_steps,
        rank=env.rank,
        world_size=env.world_size,
        collate=partial(collate_sft, config=model.config, device=env.device),
        shuffle=cfg.data.shuffle,
        seed=cfg.train.seed,
    )
    trainer = Trainer(
        model,
        SFTObjective(),
        source,
        cfg.train,
        env=env,
        phase="sft",
        run_config=to_dict(cfg),
        export_fn=hf_exporter(model.config, processor),
    )
    result = trainer.fit()
    if env.is_main:
        first, last = window_means(trainer.metrics_log.path, ["loss"], window=10)
        print(
            f"[sft] {result.step} steps, loss {first['loss']:.4f} (first 10) -> {last['loss']:.4f} (last 10); "
            f"export: {result.export_dir}",
            flush=True,
        )
    return result


if __name__ == "__main__":
    main()
