"""The GRPO batch source: each step's prompts -> rollouts -> rewards -> advantages -> packed micro-batches.

Per optimiser step and rank (phases timed into the step's metrics line):

* ``data``: the next ``micro_batch_size × grad_accum_steps`` records of this rank (deterministic, resumable
  order from ``IndexedBatchSource``), decoded and tokenised as SIF prompts;
* ``rollout``: G samples per prompt from the current policy, parameters gathered once for the whole generation;
* ``reward``: the four reward terms, the answer-progress state (shared across ranks every step, so ``s_prev`` is
  the last visit on *any* rank) and group-relative advantages;
* ``reference``: per micro-batch, reference log-probs (β > 0) and, with several updates per batch, the rollout
  policy's log-probs, both under ``no_grad``.

With ``num_iterations = k > 1`` a generated batch is reused for k consecutive optimiser steps (the first step's
log-probs are the ``old`` policy for the clipped ratio); a resume regenerates rather than replaying the cache.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from engine.data.schema import DecodedRecords, Record
from engine.distributed import unsharded
from engine.models import ModelConfig, Processor
from engine.rl.advantages import group_advantages
from engine.rl.collapse import AnswerWatch, group_signals
from engine.rl.grpo import GRPOMicroBatch, RLConfig, reference_logprobs, rollout_logprobs
from engine.rl.packing import pack_rollouts
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
    ) -> None:
        if cfg.judge_answer_types and judge is None:
            raise ValueError(f"rl.judge_answer_types = {cfg.judge_answer_types} but no judge was given")
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
        self.reference = reference
        self.judge = judge
        self.progress = AnswerProgress()
        self.answer_watch = AnswerWatch(verbose=rank == 0)
        self.last_batch: RolloutBatch | None = None
        self._cache: list[GRPOMicroBatch] = []
        self._cache_metrics: dict[str, float] = {}
        self._uses_left = 0

    @property
    def global_batch(self) -> int:
        """Prompts per generated batch over all ranks (each sampled ``num_generations`` times)."""
        return self.prompts.global_batch

    @property
    def steps_per_epoch(self) -> int:
        return self.prompts.steps_per_epoch * self.cfg.num_iterations

    def next_step(self, ctx: StepContext) -> list[GRPOMicroBatch]:
        if self._uses_left > 0:
            self._uses_left -= 1
            ctx.metrics.update(self._cache_metrics)
            return self._cache
        cfg = self.cfg
        groups = self.prompts.next_step(ctx)
        prompts = [p for g in groups for p in g]
        generator = torch.Generator(device=ctx.device).manual_seed(
            (self.seed * 1_000_003 + ctx.step) * 65_537 + ctx.rank
        )
        with ctx.timer("rollout"), torch.no_grad(), unsharded(ctx.model):
            batch = generate_rollouts(ctx.model, self.processor, prompts, cfg, generator=generator)
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
        micro_batches = []
        per = len(groups[0]) * cfg.num_generations
        with ctx.timer("reference"):
            for k in range(len(groups)):
                packed = pack_rollouts(batch.rollouts[k * per : (k + 1) * per], self.model_config).to(ctx.device)
                mb = GRPOMicroBatch(packed, advantages[k * per : (k + 1) * per].to(ctx.device))
                if cfg.beta != 0.0:
                    mb.ref_logp = reference_logprobs(ctx.model, packed, cfg.temperature, self.reference)
                if cfg.num_iterations > 1:
                    mb.old_logp = rollout_logprobs(ctx.model, packed, cfg.temperature)
                micro_batches.append(mb)
        metrics = rewards.metrics()
        metrics["reward/group_std"] = float(rewards.total.view(-1, cfg.num_generations).std(dim=1).mean())
        metrics.update(self._collapse_signals(batch, rewards))
        metrics.update(batch.metrics())
        ctx.metrics.update(metrics)
        self._cache, self._cache_metrics, self._uses_left = micro_batches, metrics, cfg.num_iterations - 1
        return micro_batches

    def _collapse_signals(self, batch: RolloutBatch, rewards: RewardBatch) -> dict[str, float]:
        """``engine.rl.collapse`` signals of this step; the answer window sees every rank's samples."""
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
        return {
            "prompts": self.prompts.state_dict(),
            "progress": self.progress.state_dict(),
            "answer_watch": self.answer_watch.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.prompts.load_state_dict(state["prompts"])
        self.progress.load_state_dict(state["progress"])
        if "answer_watch" in state:
            self.answer_watch.load_state_dict(state["answer_watch"])
        self._cache, self._cache_metrics, self._uses_left = [], {}, 0
