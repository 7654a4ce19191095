"""The SFT job (``recipes/sft_sif.py``): teach the model the interleaved <area>/<text> chain of thought before
GRPO-SIF, and the warm-up ``engine.recipes.grpo_sif`` runs when it has no SFT checkpoint to start from.

Every field of ``SFTRecipeConfig`` can be overridden as ``--section.key value``. The loss is the token mean of
the cross-entropy on assistant tokens over the whole global batch. ``--views.focus_mode crop`` inserts the crop
views after every ``</area>``, as a crop-mode rollout sees them (view tokens are not scored). Outputs:
``runs/<run_name>/metrics.jsonl``, ``curves.png``, DCP checkpoints and the merged HF export in ``hf/`` (what
the GRPO job starts from).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path

from engine.config import DataConfig, LoRAConfig, ModelSection, TrainConfig, exit_on_config_error, load_config, to_dict
from engine.data.synth import SynthSplit
from engine.distributed import DistEnv, init_distributed
from engine.recipes.policy import hf_exporter, load_policy, resolve_checkpoint
from engine.recipes.splits import generated_split, load_split
from engine.recipes.summary import window_means
from engine.rl.evaluation import EvalConfig, evaluate, report
from engine.train.batch_source import IndexedBatchSource
from engine.train.checkpoint import ResumeError
from engine.train.resume import classify
from engine.train.sft import SFTDataset, SFTObjective, SFTViews, collate_sft, prompt_shows_depth
from engine.train.trainer import Trainer, TrainResult, finished_export


@dataclass
class SFTRecipeConfig:
    """Defaults: the tiny embedded model, full fine-tuning on the bundled synthetic traces: 500 steps of one trace
    per rank (5 epochs on 2 ranks), about 3 minutes on 2 CPU cores. The tiny model's vision tower is randomly
    initialised, so it trains too (``lora.freeze_vision false``); the 7B configs freeze their pretrained one.

    synth: with ``records > 0`` and no ``data.path``, train on a freshly generated split of that many records
    (``engine.data.synth.SynthSplit``; rendered once under ``train.output_dir/data``) instead of the bundled one.
    evaluate: end with the held-out evaluation (``engine.rl.evaluation``: ``data.eval_path``, else the bundled
    ``heldout``, its first ``eval_limit`` records, 0 all), in the views' focusing mode."""

    model: ModelSection = field(default_factory=ModelSection)
    data: DataConfig = field(default_factory=lambda: DataConfig(max_seq_len=2048, max_pixels=224 * 224))
    lora: LoRAConfig = field(default_factory=lambda: LoRAConfig(freeze_vision=False))
    views: SFTViews = field(default_factory=SFTViews)
    synth: SynthSplit = field(default_factory=SynthSplit)
    eval: EvalConfig = field(default_factory=lambda: EvalConfig(max_new_tokens=512))
    evaluate: bool = True
    eval_limit: int = 0
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


@exit_on_config_error
def main(argv: list[str] | None = None) -> TrainResult:
    cfg = load_config(SFTRecipeConfig(), sys.argv[1:] if argv is None else argv)
    with init_distributed() as env:
        return run(cfg, env)


def run(cfg: SFTRecipeConfig, env: DistEnv) -> TrainResult:
    """Train with a loaded config in an initialised process group; returns the Trainer's result."""
    checkpoint = resolve_checkpoint(cfg.model, cfg.train.output_dir, env)
    model, processor = load_policy(checkpoint, cfg.model, cfg.lora, cfg.data, cfg.train.seed, env, cfg.train)

    path = cfg.data.path
    if not path and cfg.synth.records > 0:
        path = generated_split(cfg.synth, cfg.train.output_dir, env)
    records = load_split(path, "train", cfg.data.limit, max_skip_share=cfg.data.max_skip_share)
    dataset = SFTDataset(
        records,
        processor,
        with_depth=prompt_shows_depth(cfg.data.with_depth, cfg.views),
        max_seq_len=cfg.data.max_seq_len,
        views=cfg.views,
        max_skip_share=cfg.data.max_skip_share,
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
        export_fn=hf_exporter(processor),
    )
    result = trainer.fit()
    heldout = load_split(cfg.data.eval_path, "heldout", cfg.eval_limit) if cfg.evaluate else []
    if heldout:
        v = cfg.views
        eval_cfg = replace(
            cfg.eval, focus_mode=v.focus_mode, max_views=v.max_views, crop_size=v.crop_size, depth_views=v.depth_views
        )
        rows = evaluate(trainer.model, processor, heldout, eval_cfg, rank=env.rank, world_size=env.world_size)
    if env.is_main:
        if heldout:
            report({"after SFT": rows}, trainer.run_dir, f"held-out {len(heldout)} records")
        first, last = window_means(trainer.metrics_log.path, ["loss"], window=10)
        print(
            f"[sft] {result.step} steps, loss {first['loss']:.4f} (first 10) -> {last['loss']:.4f} (last 10); "
            f"export: {result.export_dir}",
            flush=True,
        )
    return result


def warm_up(cfg: SFTRecipeConfig, env: DistEnv, *, resume: bool) -> Path:
    """The SFT warm-up of the GRPO job: train (or, with ``resume``, continue) and return the HF export.

    With ``resume``, a finished warm-up (its export marked complete, ``hf/export.json``) is reused as it is, without
    loading anything; one trained with other settings is refused (ResumeError: the GRPO run continues from it);
    an unfinished one resumes from its newest checkpoint like any run."""
    run_dir = Path(cfg.train.output_dir) / cfg.train.run_name
    if resume:
        done = finished_export(run_dir)
        if done is not None:
            changes = [c for c in classify(done.get("config") or {}, to_dict(cfg)) if c.kind != "applied"]
            for change in changes:
                change.kind = "refused"
            if changes:
                raise ResumeError(
                    f"--resume refused: the finished SFT warm-up {run_dir} was trained with other settings, and the "
                    f"GRPO run continues from it; nothing was changed:\n" + "\n".join(c.line() for c in changes)
                    + "\nPut the old values back, or start a new run (another --sft.train.run_name)."
                )  # fmt: skip
            if env.is_main:
                print(
                    f"[resume] sft warm-up: finished at step {done.get('step')}; reusing {run_dir / 'hf'}", flush=True
                )
            return run_dir / "hf"
        cfg.train.resume = True
    return run(cfg, env).export_dir


if __name__ == "__main__":
    main()
