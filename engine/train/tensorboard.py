"""TensorBoard event files beside ``metrics.jsonl``: the same per-step scalars, in the format torchtitan users read.

``train.tensorboard`` picks when they are written: ``"auto"`` (the default) whenever the ``tensorboard`` package is
importable (``pip install tensorboard``, or this package's ``tensorboard`` extra), ``"on"`` always (a ConfigError
when the package is missing), ``"off"`` never. The events go to ``<run_dir>/tb/`` (``tensorboard --logdir
runs/<run-name>/tb``), one tag per numeric key of a record (``loss``, ``reward/total``, ``time/rollout``, ...) at
the record's ``step`` and ``wall_time``. JSONL stays the record of truth (plots, summaries and resume read it).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal

import torch

from engine.config import ConfigError

TensorBoardMode = Literal["auto", "on", "off"]
SKIPPED_KEYS = ("step", "wall_time")  # the event's own step and time, not scalars


def tensorboard_available() -> bool:
    """Whether the ``tensorboard`` package (which ``torch.utils.tensorboard`` needs) is importable."""
    return importlib.util.find_spec("tensorboard") is not None


def _summary_writer(**kwargs: Any) -> Any:
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(**kwargs)


class TensorBoardLog:
    """Writes the scalars of each metrics record into ``log_dir``; ``writer_factory(log_dir=..., purge_step=...)``
    builds the writer (``torch.utils.tensorboard.SummaryWriter`` by default) at the first record, so that a run
    that stops before its first step (a refused resume) leaves its folder untouched."""

    def __init__(self, log_dir: str | Path, writer_factory: Callable[..., Any] | None = None) -> None:
        self.log_dir = Path(log_dir)
        self._factory = writer_factory or _summary_writer
        self._writer: Any = None
        self._purge_step: int | None = None

    def write(self, record: Mapping[str, object]) -> None:
        """One scalar per int/float (or one-element tensor) value; strings and booleans are not scalars."""
        if self._writer is None:
            self._writer = self._factory(log_dir=str(self.log_dir), purge_step=self._purge_step)
        step, walltime = record.get("step"), record.get("wall_time")
        for key, value in record.items():
            if key in SKIPPED_KEYS:
                continue
            if isinstance(value, torch.Tensor) and value.numel() == 1:
                value = value.item()
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            self._writer.add_scalar(key, value, global_step=step, walltime=walltime)
        self._writer.flush()  # every step: the loop has no close hook, and a killed run keeps what it logged

    def purge_after(self, step: int) -> None:
        """Hide the events past ``step`` that an earlier run left (as ``MetricsLog.truncate_after`` drops their
        lines): the next record opens a new writer whose ``purge_step`` is ``step + 1``."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        self._purge_step = step + 1


def open_tensorboard(
    log_dir: str | Path, mode: TensorBoardMode, enabled: bool = True, writer_factory: Callable[..., Any] | None = None
) -> TensorBoardLog | None:
    """The run's TensorBoard log under ``mode`` (see the module docstring), or None. ``enabled=False`` (ranks other
    than 0) opens nothing but still refuses ``"on"`` without the package, so that every rank stops, not only rank 0.
    A ``writer_factory`` stands in for the package (tests)."""
    if mode not in ("auto", "on", "off"):
        raise ConfigError(f"train.tensorboard must be 'auto', 'on' or 'off', got {mode!r}")
    if mode == "off":
        return None
    available = writer_factory is not None or tensorboard_available()
    if not available:
        if mode == "on":
            raise ConfigError(
                "train.tensorboard is 'on' but the tensorboard package is not installed: pip install tensorboard "
                "(or set --train.tensorboard auto|off)"
            )
        return None
    return TensorBoardLog(log_dir, writer_factory) if enabled else None
