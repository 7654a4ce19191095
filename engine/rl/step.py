"""One GRPO-SIF optimiser step, in the order of the algorithm.

``grpo_step`` is the Trainer's ``step_fn`` for GRPO (``engine.train.Trainer`` runs the loop around it: resume,
logging, checkpoints, export)::

    1. rollout      G samples per prompt from the current policy          engine/rl/rollout.py
    2. rewards      format, answer, grounding, depth                      engine/rl/rewards.py
    3. advantages   group-relative, per prompt                            engine/rl/advantages.py
    4. log-probs    reference (β > 0) and old (the rollout policy's)      engine/rl/grpo.py
    5. loss         clipped ratio + k3 KL, per micro-batch, summed        engine/rl/grpo.py -> sif_kernels.grpo_loss
    6. update       global normalisation, clipping, AdamW, LR schedule    engine/train/trainer.py

The rollout batch and the update batch are decoupled (as verl's train batch and PPO mini-batch): one optimiser
step consumes ``S = micro_batch_size × grad_accum_steps`` prompts per rank in ``grad_accum_steps`` micro-batches,
while one rollout generates ``P = rl.rollout_prompts_per_rank`` prompts per rank at once (a multiple of S; 0
means S, one rollout per step), so that decoding runs at P × G rows. So steps 1–4 (``collect_rollout``) run once
per rollout and yield ``num_iterations`` passes over its P / S slices, one optimiser step each; the batch source
(``engine.rl.source.GRPOBatchSource``) holds them, with the prompt stream's position and the reward state that
checkpoints carry. Every slice used after the policy has moved (all but the first when P > S or
``num_iterations`` > 1) carries the rollout policy's log-probs (``old_logp``) for the clipped ratio; both
log-probs run under ``no_grad``, in eval mode (no dropout: the log-probs of the policies that sampled, not of a
dropout draw) and before any update.

Phases are timed into the metrics line of the step that runs them: ``data`` (prompts), ``rollout``, ``reward``
(rewards, the answer-progress state shared across ranks, advantages), ``reference`` (packing and step 4),
``update`` (steps 5–6).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from engine.distributed import unsharded
from engine.models.generate import eval_mode
from engine.models.packing import pack_rollouts
from engine.rl.advantages import group_advantages
from engine.rl.collapse import group_signals
from engine.rl.grpo import GRPOMicroBatch, reference_logprobs, rollout_logprobs
from engine.rl.rewards import RewardBatch, prefetch_judge, score_completions
from engine.rl.rollout import RolloutBatch, generate_rollouts
from engine.train.batch_source import StepContext

if TYPE_CHECKING:
    from engine.rl.source import GRPOBatchSource
    from engine.train.trainer import GradStats, Trainer


@dataclass
class RolloutStep:
    """One optimiser step's share of a rollout: its micro-batches and the reward figures of its slice."""

    micro_batches: list[GRPOMicroBatch]
    metrics: dict[str, float]


def grpo_step(trainer: Trainer, ctx: StepContext) -> GradStats:
    """One GRPO optimiser step: steps 1–4 when the last rollout is used up, then 5 and 6 on this step's slice.
    Returns the step's global gradient figures."""
    source: GRPOBatchSource = trainer.batch_source
    with ctx.timer("data"):
        if source.rollout_used_up:
            source.start_rollout(collect_rollout(source, ctx))  # 1-4, once per rollout
        micro_batches = source.next_step(ctx)  # this step's slice; its reward means go to ctx.metrics
    with ctx.timer("update"):
        stats = trainer.compute_gradients(micro_batches)  # 5: the objective (GRPOObjective) per micro-batch
        trainer.optimizer_step(stats)  # 6
    return stats


def collect_rollout(source: GRPOBatchSource, ctx: StepContext) -> list[RolloutStep]:
    """Steps 1–4 for one rollout of ``source.steps_per_rollout`` optimiser steps' prompts; returns its optimiser
    steps in order (``num_iterations`` passes over its slices, one slice = one step's prompts)."""
    cfg, policy, group = source.cfg, ctx.model, source.cfg.num_generations
    prompts = source.next_prompts(ctx)

    # 1. rollout: G samples per prompt, parameters gathered once for the whole generation
    generator = torch.Generator(device=ctx.device).manual_seed((source.seed * 1_000_003 + ctx.step) * 65_537 + ctx.rank)
    with ctx.timer("rollout"), torch.no_grad(), unsharded(policy):
        batch = generate_rollouts(policy, source.processor, prompts, cfg, generator=generator, engine=source.engine)
    source.last_batch = batch

    with ctx.timer("reward"):
        # 2. rewards: the four terms; the answer-progress state is shared so that s_prev is any rank's last visit
        targets = [p.target for p in prompts]
        prefetch_judge(source.judge, batch.texts, batch.prompt_index, targets, cfg.judge_answer_types)
        rewards = score_completions(
            batch.texts,
            batch.prompt_index,
            targets,
            weights=cfg.rewards,
            progress=source.progress,
            judge=source.judge,
            judge_types=cfg.judge_answer_types,
        )
        _share_progress(source, [p.record.id for p in prompts])
        # 3. advantages: (R - mean) / (std + 1e-4) over each prompt's G samples (Dr.GRPO: R - mean)
        advantages = group_advantages(rewards.total, group, scale_by_std=cfg.advantages_scaled)

    # 4. reference and old log-probs, per micro-batch, before any update
    rows = len(prompts) // (source.steps_per_rollout * source.grad_accum_steps) * group  # rows per micro-batch
    reference = source.reference
    reference_mode = eval_mode(reference) if reference is not None else contextlib.nullcontext()
    slices = []
    with ctx.timer("reference"), eval_mode(policy), reference_mode:  # no dropout: the policies themselves
        for j in range(source.steps_per_rollout):
            micro_batches = []
            for k in range(j * source.grad_accum_steps, (j + 1) * source.grad_accum_steps):
                part = slice(k * rows, (k + 1) * rows)
                packed = pack_rollouts(batch.rollouts[part], source.model_config).to(ctx.device)
                mb = GRPOMicroBatch(packed, advantages[part].to(ctx.device))
                if cfg.beta != 0.0:
                    mb.ref_logp = reference_logprobs(policy, packed, cfg.temperature, reference)
                if cfg.num_iterations > 1 or j > 0:  # used after an update: the rollout policy's log-probs
                    mb.old_logp = rollout_logprobs(policy, packed, cfg.temperature)
                micro_batches.append(mb)
            slices.append(micro_batches)

    # 5 and 6 run per optimiser step (grpo_step); each logs its own slice's reward means
    metrics = _slice_metrics(source, batch, rewards, rows * source.grad_accum_steps)
    return [RolloutStep(slices[j], metrics[j]) for _ in range(cfg.num_iterations) for j in range(len(slices))]


def _slice_metrics(
    source: GRPOBatchSource, batch: RolloutBatch, rewards: RewardBatch, rows_per_step: int
) -> list[dict[str, float]]:
    """Per optimiser step of the rollout: its slice's reward means and group std, plus the rollout's own figures
    (lengths, views, collapse signals)."""
    group = source.cfg.num_generations
    per_sample = rewards.per_sample()
    shared = batch.metrics()
    shared.update(_collapse_signals(source, batch, rewards))
    metrics = []
    for j in range(source.steps_per_rollout):
        part = slice(j * rows_per_step, (j + 1) * rows_per_step)
        m = {k: float(v[part].float().mean()) for k, v in per_sample.items()}
        m["reward/group_std"] = float(rewards.total[part].view(-1, group).std(dim=1).mean())
        m.update(shared)
        metrics.append(m)
    return metrics


def _collapse_signals(source: GRPOBatchSource, batch: RolloutBatch, rewards: RewardBatch) -> dict[str, float]:
    """``engine.rl.collapse`` signals of this rollout; the answer window sees every rank's samples."""
    records = [batch.prompts[r.prompt_index].record for r in batch.rollouts]
    answers = [parsed.answer for parsed in rewards.parsed]
    types = [r.answer_type for r in records]
    signals = group_signals(rewards.total, answers, types, source.cfg.num_generations)
    samples = [(r.qtype or r.answer_type, a, r.answer, r.answer_type) for r, a in zip(records, answers)]
    if source.world_size > 1 and dist.is_initialized():
        gathered: list[Any] = [None] * source.world_size
        dist.all_gather_object(gathered, samples)
        samples = [s for part in gathered for s in part]
    if samples:
        signals.update(source.answer_watch.update(*(list(column) for column in zip(*samples))))
    return signals


def _share_progress(source: GRPOBatchSource, record_ids: list[str]) -> None:
    """Make this rollout's answer-progress updates of every rank known to all ranks."""
    if source.world_size == 1 or not dist.is_initialized():
        return
    mine = {rid: source.progress.get(rid) for rid in record_ids}
    gathered: list[Any] = [None] * source.world_size
    dist.all_gather_object(gathered, mine)
    for update in gathered:
        source.progress.merge({k: v for k, v in update.items() if v is not None})
