"""Step metrics: named phase timers, cross-rank averaging and the JSONL log (with TensorBoard events beside it).

``PhaseTimer`` measures *exclusive* wall time per named phase: a phase opened inside another is subtracted from
its parent, so the phases of a step (e.g. ``data``, ``rollout``, ``reward``, ``update``) add up to the step time.
On CUDA the timer synchronises the device at phase boundaries so that asynchronous kernels are charged to the
phase that launched them (opt out with ``sync_cuda=False``).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
import warnings
import zlib
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from engine.train.tensorboard import TensorBoardMode, open_tensorboard


class PhaseTimer:
    """Accumulates exclusive seconds per phase name within one step; ``reset()`` between steps."""

    def __init__(self, sync_cuda: bool = True) -> None:
        self.sync_cuda = sync_cuda and torch.cuda.is_available()
        self.seconds: dict[str, float] = {}
        self._stack: list[list[float]] = []  # [start, child seconds]

    def reset(self) -> None:
        if self._stack:
            raise RuntimeError(f"PhaseTimer.reset inside an open phase ({len(self._stack)} open)")
        self.seconds = {}

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Time the enclosed block as ``name`` (re-entering a name accumulates)."""
        self._sync()
        frame = [time.perf_counter(), 0.0]
        self._stack.append(frame)
        try:
            yield
        finally:
            self._sync()
            self._stack.pop()
            total = time.perf_counter() - frame[0]
            self.seconds[name] = self.seconds.get(name, 0.0) + total - frame[1]
            if self._stack:
                self._stack[-1][1] += total

    __call__ = phase

    def _sync(self) -> None:
        if self.sync_cuda:
            torch.cuda.synchronize()


def mean_across_ranks(values: Mapping[str, float], device: torch.device) -> dict[str, float]:
    """Average each metric over ranks; a metric missing on some ranks is averaged over the ranks that have it.

    Key sets may differ between ranks (e.g. a reward term only present where a sample produced it): a checksum
    of the key names is compared first (one tiny all-reduce); only when they differ are the names exchanged
    (all_gather_object) and their union used. Then one all-reduce carries (sum, count) pairs. NaN stays NaN.
    """
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return {k: float(v) for k, v in values.items()}
    keys = sorted(values)
    checksum = zlib.crc32("\0".join(keys).encode())
    probe = torch.tensor([checksum, -checksum], dtype=torch.int64, device=device)
    dist.all_reduce(probe, op=dist.ReduceOp.MAX)
    if probe[0].item() != -probe[1].item():
        gathered: list[list[str] | None] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, keys)
        keys = sorted(set().union(*[set(g or ()) for g in gathered]))
    buf = torch.zeros(2, len(keys), dtype=torch.float64, device=device)
    for i, key in enumerate(keys):
        if key in values:
            buf[0, i] = float(values[key])
            buf[1, i] = 1.0
    dist.all_reduce(buf)
    return {k: (buf[0, i] / buf[1, i]).item() for i, k in enumerate(keys)}


class MetricsLog:
    """Appends one JSON object per step to ``path`` (rank 0 only; other ranks hold a disabled log).

    Non-finite floats are written as JSON ``null`` (strict JSON), with the record still naming the key.
    ``truncate_after(step)`` drops lines past a resumed step so that a restarted run's curve has no duplicates; a
    torn last line (a writer killed mid-line) is dropped with a warning; the file is rewritten atomically.
    ``set_aside()`` keeps an existing log as ``metrics.jsonl.N`` (a ``--resume`` that found no checkpoint).
    ``tensorboard`` (``train.tensorboard``; ``engine.train.tensorboard``) also writes every record's scalars as
    TensorBoard events under ``<folder of path>/tb/``, with the events past a truncated step hidden.
    """

    def __init__(
        self,
        path: str | Path,
        enabled: bool = True,
        tensorboard: TensorBoardMode = "off",
        writer_factory: Callable[..., Any] | None = None,
    ) -> None:
        self.path = Path(path)
        self.enabled = enabled
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tensorboard = open_tensorboard(self.path.parent / "tb", tensorboard, enabled, writer_factory)

    def truncate_after(self, step: int) -> None:
        if self.tensorboard is not None:
            self.tensorboard.purge_after(step)
        if not self.enabled or not self.path.exists():
            return
        kept = [r for r in _parse_lines(self.path) if r[1].get("step", 0) <= step] if step > 0 else []
        tmp = self.path.with_name(self.path.name + ".partial")
        tmp.write_text("".join(line + "\n" for line, _ in kept))
        os.replace(tmp, self.path)

    def set_aside(self) -> Path | None:
        """Rename a non-empty log to the first free ``<name>.N``; returns the new path."""
        if not self.enabled or not self.path.exists() or self.path.stat().st_size == 0:
            return None
        k = 1
        while (target := self.path.with_name(f"{self.path.name}.{k}")).exists():
            k += 1
        os.replace(self.path, target)
        warnings.warn(f"{self.path}: the earlier log is kept as {target.name}", stacklevel=2)
        return target

    def write(self, record: Mapping[str, object]) -> None:
        if not self.enabled:
            return
        clean = {k: _json_value(v) for k, v in record.items()}
        with self.path.open("a") as fh:
            fh.write(json.dumps(clean) + "\n")
        if self.tensorboard is not None:
            self.tensorboard.write(record)


def _parse_lines(path: Path) -> list[tuple[str, dict]]:
    """(line, record) of every non-empty line; a torn last line is dropped with a warning, any other malformed
    line raises ValueError naming ``file:line``."""
    lines = path.read_text().splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    out = []
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if not isinstance(record, dict):
                raise ValueError(f"expected a JSON object, got {type(record).__name__}")
        except ValueError as exc:
            if lineno == len(lines):
                warnings.warn(f"{path}:{lineno}: dropping a torn last line ({exc}): {line[:80]!r}", stacklevel=3)
                break
            raise ValueError(f"{path}:{lineno}: malformed metrics line: {exc}") from exc
        out.append((line, record))
    return out


def _json_value(value: object) -> object:
    if isinstance(value, torch.Tensor):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def read_metrics(path: str | Path) -> list[dict[str, object]]:
    """All records of a metrics JSONL file; a torn last line is dropped with a warning; raises naming the file and
    line on any other malformed line."""
    return [record for _, record in _parse_lines(Path(path))]
