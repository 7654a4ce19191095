"""The GRPO-SIF job (``recipes/grpo_sif.py``): reinforce the SIF chain of thought with format, answer, grounding
and depth rewards.

``model.path`` is the SFT checkpoint to start from. Left empty, the job first runs the SFT warm-up
(``engine.recipes.sft_sif.warm_up``) with the ``sft`` section (the tiny embedded model on the bundled traces) and
starts from its export, so one command runs the whole job. ``rl.focus_mode crop`` switches from the release's
text-only boxes to cropped views spliced into the generation. Every field is overridable on the command line
(``--rl.num_generations 4``). Outputs: ``runs/<run_name>/metrics.jsonl``
(``reward/format|answer|grounding|depth|total`` per step), ``curves.png``, checkpoints, the merged HF export, and a
printed first-vs-last summary of the reward means.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field, replace

from engine.config import DataConfig, LoRAConfig, ModelSection, TrainConfig, exit_on_config_error, load_config, to_dict
from engine.data.schema import Record
from engine.data.synth import SynthSplit
from engine.distributed import DistEnv, init_distributed
from engine.models import Processor
from engine.recipes import sft_sif
from engine.recipes.policy import frozen_copy, hf_exporter, load_policy, resolve_checkpoint
from engine.recipes.splits import generated_split, load_split
from engine.recipes.summary import window_means
from engine.rl.evaluation import EvalConfig, evaluate, report
from engine.rl.grpo import GRPOObjective, RLConfig
from engine.rl.probe import PROBE_KEYS, probe_rewards
from engine.rl.rewards import http_judge
from engine.rl.source import GRPOBatchSource
from engine.rl.step import grpo_step
from engine.train.sft import SFTViews
from engine.train.trainer import Trainer, TrainResult


def _tiny_rl() -> RLConfig:
    """The released settings (G=8, β=0.04, ε=0.2) except temperature 0.3: the tiny model's format errors are
    per-token sampling slips (an x2 below its x1, a tag left open), so a hotter policy plateaus below its format
    target (benchmarks/results/2026-11-26-cpu-temperature.md). Traces are ~210 tokens; 512 leaves room."""
    return RLConfig(num_generations=8, beta=0.04, max_completion_length=512, temperature=0.3)


@dataclass
class GRPORecipeConfig:
    """Defaults: the tiny embedded model on the bundled scenes, full fine-tuning (its randomly initialised vision
    tower included), text focusing mode, 120 steps of one prompt x 8 samples per rank at lr 1e-4 (about 5 minutes on
    2 CPU cores; a higher rate collapses the policy onto one short template, the same note says).

    summary_window: steps in the printed first-vs-last means of the logged rewards. probe_prompts: the first N
    training prompts are scored before and after GRPO with fixed seeds (``engine.rl.probe``; 0: no probe).
    synth: with ``records > 0`` and no ``data.path``, the GRPO prompts come from a generated split (as the
    ``sft`` section's own ``synth`` for the warm-up).
    evaluate: score the starting policy and the trained one on the held-out split (``data.eval_path``, else the
    bundled ``heldout``; the first ``eval_limit`` records, 0 all) with ``engine.rl.evaluation`` (the ``eval``
    section's decoding, in the run's focusing mode) and print them side by side with the baselines.
    """

    model: ModelSection = field(default_factory=ModelSection)
    data: DataConfig = field(default_factory=lambda: DataConfig(max_seq_len=4096, max_pixels=224 * 224))
    lora: LoRAConfig = field(default_factory=lambda: LoRAConfig(freeze_vision=False))
    rl: RLConfig = field(default_factory=_tiny_rl)
    train: TrainConfig = field(
        default_factory=lambda: TrainConfig(
            run_name="grpo-tiny",
            lr=1e-4,
            warmup_ratio=0.0,
            schedule="constant",
            micro_batch_size=1,
            grad_accum_steps=1,
            max_steps=120,
        )
    )
    sft: sft_sif.SFTRecipeConfig = field(default_factory=sft_sif.SFTRecipeConfig)
    synth: SynthSplit = field(default_factory=SynthSplit)
    eval: EvalConfig = field(default_factory=lambda: EvalConfig(max_new_tokens=512))
    summary_window: int = 10
    probe_prompts: int = 32
    evaluate: bool = True
    eval_limit: int = 0


@exit_on_config_error
def main(argv: list[str] | None = None) -> TrainResult:
    cfg = load_config(GRPORecipeConfig(), sys.argv[1:] if argv is None else argv)
    with init_distributed() as env:
        return run(cfg, env)


def run(cfg: GRPORecipeConfig, env: DistEnv) -> TrainResult:
    """SFT warm-up if needed, then GRPO-SIF, in an initialised process group; prints the reward summary."""
    if not cfg.model.path:
        cfg.sft.evaluate = False  # the GRPO run scores the SFT export itself, beside its own result
        if cfg.rl.focus_mode == "crop":  # warm up on the sequences a crop-mode policy generates
            cfg.sft.views = SFTViews("crop", cfg.rl.max_views, cfg.rl.crop_size, cfg.rl.depth_views)
        cfg.model.path = str(sft_sif.warm_up(cfg.sft, env, resume=cfg.train.resume))  # --resume reaches it
    checkpoint = resolve_checkpoint(cfg.model, cfg.train.output_dir, env)
    # sharded from the start on the training device (each rank reads only its shards' slices of the checkpoint)
    model, processor = load_policy(checkpoint, cfg.model, cfg.lora, cfg.data, cfg.train.seed, env, cfg.train)
    reference = None
    if cfg.rl.beta != 0.0 and not cfg.lora.enabled:
        reference = frozen_copy(model, env, cfg.model, cfg.train)  # its own shards, nothing shared with the policy

    path = cfg.data.path
    if not path and cfg.synth.records > 0:
        path = generated_split(cfg.synth, cfg.train.output_dir, env)
    records = load_split(path, "train", cfg.data.limit, max_skip_share=cfg.data.max_skip_share)
    source = GRPOBatchSource(
        records,
        processor,
        model.config,
        cfg.rl,
        micro_batch_size=cfg.train.micro_batch_size,
        grad_accum_steps=cfg.train.grad_accum_steps,
        rank=env.rank,
        world_size=env.world_size,
        seed=cfg.train.seed,
        shuffle=cfg.data.shuffle,
        reference=reference,
        judge=http_judge(cfg.rl.judge_url, answer_types=cfg.rl.judge_answer_types) if cfg.rl.judge_url else None,
        max_skip_share=cfg.data.max_skip_share,
    )
    trainer = Trainer(
        model,
        GRPOObjective(cfg.rl),
        source,
        cfg.train,
        env=env,
        phase="grpo",
        run_config=to_dict(cfg),
        step_fn=grpo_step,
        export_fn=hf_exporter(processor),
    )
    model = trainer.model  # sharded: the probe and the held-out evaluation run on the training device
    probe = source.first_prompts(cfg.probe_prompts, env.device)  # bad media skipped and counted
    probe_kwargs = dict(seed=cfg.train.seed, rank=env.rank, world_size=env.world_size, judge=source.judge)
    probe_kwargs["device"] = env.device  # collectives on the training device
    before = probe_rewards(model, processor, probe, cfg.rl, **probe_kwargs) if probe else None
    heldout = load_split(cfg.data.eval_path, "heldout", cfg.eval_limit) if cfg.evaluate else []
    start_eval = _start_evaluation(trainer, processor, heldout, cfg, env) if heldout else None
    result = trainer.fit()
    after = probe_rewards(model, processor, probe, cfg.rl, **probe_kwargs) if probe else None
    eval_cfg = _eval_config(cfg)
    end_eval = (
        evaluate(model, processor, heldout, eval_cfg, rank=env.rank, world_size=env.world_size) if heldout else []
    )
    if env.is_main:
        first, last = window_means(trainer.metrics_log.path, PROBE_KEYS, cfg.summary_window)
        w = cfg.summary_window
        print(f"[grpo] {result.step} steps ({cfg.rl.focus_mode} mode); reward means, first {w} vs last {w} steps:")
        _print_change(first, last)
        if before is not None and after is not None:
            n, g = len(probe), cfg.rl.num_generations
            print(f"[grpo] probe, the same {n} training prompts x {g} samples with fixed seeds, before vs after:")
            _print_change(before, after)
            probe_file = trainer.run_dir / "probe.json"
            probe_file.write_text(json.dumps({"prompts": n, "samples": g, "before": before, "after": after}) + "\n")
        if heldout:
            named = {"SFT export": start_eval, "after GRPO": end_eval}
            report(named, trainer.run_dir, f"held-out {len(heldout)} records, {cfg.rl.focus_mode} mode")
    return result


def _eval_config(cfg: GRPORecipeConfig) -> EvalConfig:
    """The recipe's eval section in the rollouts' focusing mode and crop settings."""
    rl = cfg.rl
    return replace(
        cfg.eval,
        focus_mode=rl.focus_mode,
        max_views=rl.max_views,
        crop_size=rl.crop_size,
        depth_views=rl.depth_views,
        prompt_depth_image=rl.prompt_depth_image,
    )


def _start_evaluation(
    trainer: Trainer, processor: Processor, heldout: list[Record], cfg: GRPORecipeConfig, env: DistEnv
) -> list[dict]:
    """Held-out rows of the starting policy (the SFT export); kept in ``eval_start.json`` so that a resumed run
    compares against the policy the run started from, not the checkpoint it resumed."""
    saved = trainer.run_dir / "eval_start.json"
    if cfg.train.resume and saved.is_file():
        return json.loads(saved.read_text())
    rows = evaluate(trainer.model, processor, heldout, _eval_config(cfg), rank=env.rank, world_size=env.world_size)
    if env.is_main:
        saved.parent.mkdir(parents=True, exist_ok=True)
        saved.write_text(json.dumps(rows) + "\n")
    return rows


def _print_change(start: dict[str, float], end: dict[str, float]) -> None:
    for k in PROBE_KEYS:
        print(f"  {k:<18} {start[k]:7.3f} -> {end[k]:7.3f}")
    ag_start = start["reward/answer"] + start["reward/grounding"]
    ag_end = end["reward/answer"] + end["reward/grounding"]
    print(f"  {'answer+grounding':<18} {ag_start:7.3f} -> {ag_end:7.3f}", flush=True)


if __name__ == "__main__":
    main()
