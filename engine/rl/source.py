"""The GRPO batch source: each rollout's prompts -> rollouts -> rewards -> advantages -> packed micro-batches.

The rollout batch and the update batch are decoupled (as verl's train batch and PPO mini-batch): one optimiser
step consumes ``S = micro_batch_size × grad_accum_steps`` prompts per rank in ``grad_accum_steps`` micro-batches,
while one rollout generates ``P = rl.rollout_prompts_per_rank`` prompts per rank at once (a multiple of S; 0
means S, one rollout per step), so that decoding runs at P × G rows. Per rollout and rank (phases timed into the
metrics line of the step that runs it):

* ``data``: the next P records of this rank (P / S steps of the deterministic, resumable order of
  ``IndexedBatchSource``), decoded and tokenised as SIF prompts;
* ``rollout``: G samples per prompt from the current policy, parameters gathered once for the whole generation;
* ``reward``: the four reward terms, the answer-progress state (shared across ranks every rollout, so ``s_prev``
  is the last visit on *any* rank) and group-relative advantages;
* ``reference``: per micro-batch, reference log-probs (β > 0) and, for every step that runs after the policy
  has moved (all but the first when P > S or ``num_iterations`` > 1), the rollout policy's log-probs (the
  ``old`` policy of the clipped ratio), both under ``no_grad``, in eval mode (no dropout: the log-probs of the
  policies that sampled, not of a dropout draw) and before any update.

The rollout then feeds ``num_iterations`` passes over its P / S slices, one optimiser step each; each step logs
its own slice's reward means. The loss normalisation is the Trainer's, per optimiser step, unchanged. A resume
from a checkpoint taken mid-rollout regenerates that rollout (same prompts, the current policy) and runs the
steps that had not run, rather than replaying a cache.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from functools import partial
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from engine.data.schema import DecodedRecords, Record
from engine.distributed import unsharded
from engine.models import ModelConfig, Processor
from engine.models.generate import DecodeEngine, eval_mode
from engine.models.packing import pack_rollouts
from engine.rl.advantages import group_advantages
from engine.rl.collapse import AnswerWatch, group_signals
from engine.rl.grpo import GRPOMicroBatch, RLConfig, reference_logprobs, rollout_logprobs
from engine.rl.prompts import SIFPrompt, build_prompt
from engine.rl.rewards import AnswerProgress, Judge, RewardBatch, prefetch_judge, score_completions
from engine.rl.rollout import RolloutBatch, generate_rollouts
from engine.train.batch_source import IndexedBatchSource, StepContext


class GRPOBatchSource:
    """Implements engine.train.batch_source.BatchSource for GRPO-SIF (see the module docstring).

    records: the training prompts (each needs gt_boxes for grounding; depth for the depth reward / crops).
    reference: a frozen reference model for full fine-tuning (None: the policy with LoRA adapters off).
    judge: the optional answer judge for ``cfg.judge_answer_types``.
    max_skip_share: records whose media cannot be decoded are skipped where their prompt is built (named, counted
        with the loader's skips, replaced by the next decodable record: ``engine.data.schema.DecodedRecords``);
        the run stops with the list once more than this share of the records is skipped.
    engine: the rollouts' ``DecodeEngine`` (default: one for the run, so the static decode step, its CUDA graphs
        and the KV cache are built once; ``cfg.keep_kv_cache`` says whether the cache outlives each rollout).
    """

    def __init__(
        self,
        records: Sequence[Record],
        processor: Processor,
        model_config: ModelConfig,
        cfg: RLConfig,
        *,
        micro_batch_size: int,
        grad_accum_steps: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle: bool = True,
        reference: nn.Module | None = None,
        judge: Judge | None = None,
        max_skip_share: float = 0.1,
        engine: DecodeEngine | None = None,
    ) -> None:
        if cfg.judge_answer_types and judge is None:
            raise ValueError(f"rl.judge_answer_types = {cfg.judge_answer_types} but no judge was given")
        per_step = micro_batch_size * grad_accum_steps
        rollout_prompts = cfg.rollout_prompts_per_rank or per_step
        if rollout_prompts % per_step:
            raise ValueError(
                f"rl.rollout_prompts_per_rank = {rollout_prompts} must be a multiple of the prompts of one optimiser "
                f"step per rank, train.micro_batch_size x train.grad_accum_steps = {per_step}"
            )
        decode = partial(build_prompt, processor=processor, with_depth=cfg.depth_in_prompt)
        self.decoded = DecodedRecords(records, decode, max_share=max_skip_share)
        self.prompts = IndexedBatchSource(
            self.decoded,
            micro_batch_size=micro_batch_size,
            grad_accum_steps=grad_accum_steps,
            rank=rank,
            world_size=world_size,
            collate=list,
            shuffle=shuffle,
            seed=seed,
        )
        self.processor = processor
        self.model_config = model_config
        self.cfg = cfg
        self.seed = seed
        self.rank, self.world_size = rank, world_size
        self.grad_accum_steps = grad_accum_steps
        self.steps_per_rollout = rollout_prompts // per_step  # optimiser steps (x num_iterations) per rollout
        self.reference = reference
        self.judge = judge
        self.engine = engine if engine is not None else DecodeEngine(keep_cache=cfg.keep_kv_cache)
        self.progress = AnswerProgress()
        self.answer_watch = AnswerWatch(verbose=rank == 0)
        self.last_batch: RolloutBatch | None = None
        self._steps: list[tuple[list[GRPOMicroBatch], dict[str, float]]] = []  # the rollout's steps, in order
        self._next = 0  # index into _steps of the next step
        self._skip = 0  # steps of the first rollout after a resume that ran before the checkpoint
        self._prompts_state: dict[str, Any] | None = None  # the prompt stream's position before this rollout

    @property
    def global_batch(self) -> int:
        """Prompts per optimiser step over all ranks (each sampled ``num_generations`` times)."""
        return self.prompts.global_batch

    @property
    def steps_per_epoch(self) -> int:
        return self.prompts.steps_per_epoch * self.cfg.num_iterations

    def next_step(self, ctx: StepContext) -> list[GRPOMicroBatch]:
        if self._next >= len(self._steps):
            self._rollout(ctx)
            self._next, self._skip = self._skip, 0
        self._next = min(self._next, len(self._steps) - 1)
        micro_batches, metrics = self._steps[self._next]
        self._next += 1
        ctx.metrics.update(metrics)
        return micro_batches

    def _rollout(self, ctx: StepContext) -> None:
        """Generate ``steps_per_rollout`` optimiser steps' prompts in one call; score, pack and precompute.

        The steps come out as ``num_iterations`` passes over the rollout's slices (one slice = one optimiser step's
        prompts, split into ``grad_accum_steps`` micro-batches). Every slice but the first of the first pass is
        used after the policy has been updated, so it carries the rollout policy's log-probs (``old_logp``) for
        the clipped ratio, computed here before any update."""
        cfg = self.cfg
        self._prompts_state = self.prompts.state_dict()
        groups = [g for _ in range(self.steps_per_rollout) for g in self.prompts.next_step(ctx)]
        prompts = [p for g in groups for p in g]
        generator = torch.Generator(device=ctx.device).manual_seed(
            (self.seed * 1_000_003 + ctx.step) * 65_537 + ctx.rank
        )
        with ctx.timer("rollout"), torch.no_grad(), unsharded(ctx.model):
            batch = generate_rollouts(ctx.model, self.processor, prompts, cfg, generator=generator, engine=self.engine)
        self.last_batch = batch
        with ctx.timer("reward"):
            targets = [p.target for p in prompts]
            prefetch_judge(self.judge, batch.texts, batch.prompt_index, targets, cfg.judge_answer_types)
            rewards = score_completions(
                batch.texts,
                batch.prompt_index,
                [p.target for p in prompts],
                weights=cfg.rewards,
                progress=self.progress,
                judge=self.judge,
                judge_types=cfg.judge_answer_types,
            )
            self._share_progress([p.record.id for p in prompts])
            advantages = group_advantages(rewards.total, cfg.num_generations, scale_by_std=cfg.advantages_scaled)
        per = len(groups[0]) * cfg.num_generations  # rows per micro-batch
        accum = self.grad_accum_steps
        slices = []
        reference_mode = eval_mode(self.reference) if self.reference is not None else contextlib.nullcontext()
        with ctx.timer("reference"), eval_mode(ctx.model), reference_mode:  # no dropout: the policies themselves
            for j in range(self.steps_per_rollout):
                micro_batches = []
                for k in range(j * accum, (j + 1) * accum):
                    rows = slice(k * per, (k + 1) * per)
                    packed = pack_rollouts(batch.rollouts[rows], self.model_config).to(ctx.device)
                    mb = GRPOMicroBatch(packed, advantages[rows].to(ctx.device))
                    if cfg.beta != 0.0:
                        mb.ref_logp = reference_logprobs(ctx.model, packed, cfg.temperature, self.reference)
                    if cfg.num_iterations > 1 or j > 0:
                        mb.old_logp = rollout_logprobs(ctx.model, packed, cfg.temperature)
                    micro_batches.append(mb)
                slices.append(micro_batches)
        per_sample = rewards.per_sample()
        shared = batch.metrics()
        shared.update(self._collapse_signals(batch, rewards))
        rows_per_step = per * accum
        metrics = []
        for j in range(self.steps_per_rollout):
            part = slice(j * rows_per_step, (j + 1) * rows_per_step)
            m = {k: float(v[part].float().mean()) for k, v in per_sample.items()}
            m["reward/group_std"] = float(rewards.total[part].view(-1, cfg.num_generations).std(dim=1).mean())
            m.update(shared)
            metrics.append(m)
        self._steps = [(slices[j], metrics[j]) for _ in range(cfg.num_iterations) for j in range(len(slices))]

    def _collapse_signals(self, batch: RolloutBatch, rewards: RewardBatch) -> dict[str, float]:
        """``engine.rl.collapse`` signals of this rollout; the answer window sees every rank's samples."""
        records = [batch.prompts[r.prompt_index].record for r in batch.rollouts]
        answers = [parsed.answer for parsed in rewards.parsed]
        types = [r.answer_type for r in records]
        signals = group_signals(rewards.total, answers, types, self.cfg.num_generations)
        samples = [(r.qtype or r.answer_type, a, r.answer, r.answer_type) for r, a in zip(records, answers)]
        if self.world_size > 1 and dist.is_initialized():
            gathered: list[Any] = [None] * self.world_size
            dist.all_gather_object(gathered, samples)
            samples = [s for part in gathered for s in part]
        if samples:
            signals.update(self.answer_watch.update(*(list(column) for column in zip(*samples))))
        return signals

    def first_prompts(self, n: int, device: torch.device | None = None) -> list[SIFPrompt]:
        """The first ``n`` decodable prompts in record order (e.g. a probe); bad records are skipped and counted.
        Collective (the skips are shared): every rank calls it."""
        out: list[SIFPrompt] = []
        for i in range(len(self.decoded)):
            if len(out) == n:
                break
            prompt = self.decoded.try_decode(i)
            if prompt is not None:
                out.append(prompt)
        self.decoded.sync_skips(device)
        return out

    def _share_progress(self, record_ids: list[str]) -> None:
        """Make this step's answer-progress updates of every rank known to all ranks."""
        if self.world_size == 1 or not dist.is_initialized():
            return
        mine = {rid: self.progress.get(rid) for rid in record_ids}
        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, mine)
        for update in gathered:
            self.progress.merge({k: v for k, v in update.items() if v is not None})

    def state_dict(self) -> dict[str, Any]:
        """The data position; mid-rollout, the position before the rollout and how many of its steps ran."""
        if 0 < self._next < len(self._steps):
            return {
                "prompts": self._prompts_state,
                "progress": self.progress.state_dict(),
                "answer_watch": self.answer_watch.state_dict(),
                "rollout_steps_done": self._next,
            }
        return {
            "prompts": self.prompts.state_dict(),
            "progress": self.progress.state_dict(),
            "answer_watch": self.answer_watch.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume: a checkpoint taken mid-rollout regenerates that rollout (same prompts, the current policy) and
        continues with the steps that had not run."""
        self.prompts.load_state_dict(state["prompts"])
        self.progress.load_state_dict(state["progress"])
        if "answer_watch" in state:
            self.answer_watch.load_state_dict(state["answer_watch"])
        self._steps, self._next, self._skip = [], 0, int(state.get("rollout_steps_done", 0))
