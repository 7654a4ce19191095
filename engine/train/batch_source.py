"""Where a Trainer's micro-batches come from, and a deterministic, resumable source over an indexed dataset.

A batch source yields, per optimiser step, this rank's list of micro-batches (gradient accumulation = the list's
length, equal on every rank). It may do real work to produce them — a GRPO source generates rollouts with the
current policy and scores them — timing that work with ``ctx.timer("rollout")`` and reporting figures such as
rewards in ``ctx.metrics``; both land in the step's metrics line. Its ``state_dict()`` (JSON-serialisable) is the
data position saved in checkpoints.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from engine.train.metrics import PhaseTimer


@dataclass
class StepContext:
    """What a batch source sees when asked for a step's micro-batches."""

    model: nn.Module
    step: int  # the optimiser step about to run (0-based)
    rank: int
    world_size: int
    device: torch.device
    timer: PhaseTimer
    metrics: dict[str, float] = field(default_factory=dict)


@runtime_checkable
class BatchSource(Protocol):
    """Per-step micro-batches for this rank. ``steps_per_epoch`` (optional attribute) enables epoch budgets."""

    def next_step(self, ctx: StepContext) -> list[Any]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class IndexedBatchSource:
    """Shuffled epochs over ``dataset`` (any ``Sequence``), split into global batches across ranks.

    One optimiser step consumes ``micro_batch_size * grad_accum_steps * world_size`` items; rank r takes the r-th
    contiguous chunk and splits it into ``grad_accum_steps`` micro-batches, each passed through ``collate``.
    So one process with ``grad_accum_steps=k*n`` sees the same items per step as ``n`` processes with ``k``.
    The order is a pure function of (seed, epoch): resuming from ``state_dict()`` reproduces it exactly.
    The last incomplete global batch of an epoch is dropped. A dataset with a ``sync_skips(device)`` method
    (``engine.data.schema.DecodedRecords``: records whose media cannot be decoded are skipped) is synced after
    every step, on every rank; its count of skipped records is logged as ``data/skipped``.
    """

    def __init__(
        self,
        dataset: Sequence[Any],
        *,
        micro_batch_size: int,
        grad_accum_steps: int,
        rank: int = 0,
        world_size: int = 1,
        collate: Callable[[list[Any]], Any] = list,
        shuffle: bool = True,
        seed: int = 0,
    ) -> None:
        if micro_batch_size < 1 or grad_accum_steps < 1:
            raise ValueError(
                f"micro_batch_size and grad_accum_steps must be >= 1, got {micro_batch_size}, {grad_accum_steps}"
            )
        self.dataset = dataset
        self.micro_batch_size = micro_batch_size
        self.grad_accum_steps = grad_accum_steps
        self.rank, self.world_size = rank, world_size
        self.collate = collate
        self.shuffle = shuffle
        self.seed = seed
        self.global_batch = micro_batch_size * grad_accum_steps * world_size
        if len(dataset) < self.global_batch:
            raise ValueError(
                f"dataset has {len(dataset)} items, fewer than one global batch "
                f"({micro_batch_size} x {grad_accum_steps} accumulation x {world_size} ranks)"
            )
        self.epoch = 0
        self.batch_in_epoch = 0
        self._order: list[int] | None = None

    @property
    def steps_per_epoch(self) -> int:
        return len(self.dataset) // self.global_batch

    def _epoch_order(self) -> list[int]:
        if self._order is None:
            if self.shuffle:
                gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
                self._order = torch.randperm(len(self.dataset), generator=gen).tolist()
            else:
                self._order = list(range(len(self.dataset)))
        return self._order

    def next_step(self, ctx: StepContext | None = None) -> list[Any]:
        if self.batch_in_epoch >= self.steps_per_epoch:
            self.epoch += 1
            self.batch_in_epoch = 0
            self._order = None
        order = self._epoch_order()
        per_rank = self.micro_batch_size * self.grad_accum_steps
        start = self.batch_in_epoch * self.global_batch + self.rank * per_rank
        mine = order[start : start + per_rank]
        self.batch_in_epoch += 1
        mbs = self.micro_batch_size
        out = [self.collate([self.dataset[i] for i in mine[j : j + mbs]]) for j in range(0, per_rank, mbs)]
        sync = getattr(self.dataset, "sync_skips", None)  # a DecodedRecords dataset: share its skips, check the limit
        if sync is not None:
            skipped = sync(ctx.device if ctx is not None else None)
            if skipped and ctx is not None:
                ctx.metrics["data/skipped"] = float(skipped)
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch, "seed": self.seed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("seed", self.seed) != self.seed:
            raise ValueError(f"data state was saved with seed {state['seed']}, this run uses {self.seed}")
        self.epoch = int(state["epoch"])
        self.batch_in_epoch = int(state["batch_in_epoch"])
        self._order = None
