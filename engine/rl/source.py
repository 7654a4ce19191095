"""The GRPO batch source: the prompt stream, the reward state and the current rollout's optimiser steps.

``next_step`` hands out one optimiser step's micro-batches; when the last rollout's steps are used up it runs
``engine.rl.step.collect_rollout`` (rollout, rewards, advantages, reference and old log-probs; the algorithm is
read there) on the next ``rl.rollout_prompts_per_rank`` prompts of this rank. What a checkpoint needs lives here:
the position in the deterministic, resumable order of ``IndexedBatchSource``, the answer-progress state, the
collapse watch. A resume from a checkpoint taken mid-rollout regenerates that rollout (same prompts, the current
policy) and runs the steps that had not run, rather than replaying a cache.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import Any

import torch
from torch import nn

from engine.data.schema import DecodedRecords, Record
from engine.models import ModelConfig, Processor
from engine.models.generate import DecodeEngine
from engine.rl.collapse import AnswerWatch
from engine.rl.grpo import GRPOMicroBatch, RLConfig
from engine.rl.prompts import SIFPrompt, build_prompt
from engine.rl.rewards import AnswerProgress, Judge
from engine.rl.rollout import RolloutBatch
from engine.rl.step import RolloutStep, collect_rollout
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
        self._steps: list[RolloutStep] = []  # the rollout's steps, in order
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

    @property
    def rollout_used_up(self) -> bool:
        """Whether every optimiser step of the current rollout has been handed out (or none was generated)."""
        return self._next >= len(self._steps)

    def start_rollout(self, steps: list[RolloutStep]) -> None:
        """Hold a new rollout's optimiser steps; after a resume mid-rollout, skip those that had already run."""
        self._steps = steps
        self._next, self._skip = min(self._skip, len(steps) - 1), 0

    def next_step(self, ctx: StepContext) -> list[GRPOMicroBatch]:
        """This rank's micro-batches of the next optimiser step, with its slice's reward figures in
        ``ctx.metrics``; generates a rollout first when the last one's steps are used up."""
        if self.rollout_used_up:
            self.start_rollout(collect_rollout(self, ctx))
        step = self._steps[self._next]
        self._next += 1
        ctx.metrics.update(step.metrics)
        return step.micro_batches

    def next_prompts(self, ctx: StepContext) -> list[SIFPrompt]:
        """This rank's prompts of the next rollout (``steps_per_rollout`` optimiser steps' worth), in order."""
        self._prompts_state = self.prompts.state_dict()
        groups = [g for _ in range(self.steps_per_rollout) for g in self.prompts.next_step(ctx)]
        return [p for g in groups for p in g]

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
