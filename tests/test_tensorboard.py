"""TensorBoard events beside metrics.jsonl: the scalars written, the purge on a truncated log, the auto/on/off switch.

A fake writer stands in for ``torch.utils.tensorboard.SummaryWriter``; the last test reads real event files back and
runs only where the ``tensorboard`` package is installed.
"""

from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

import engine.train.tensorboard as tb
from engine.config import ConfigError, TrainConfig, load_config
from engine.train.metrics import MetricsLog, read_metrics


class FakeWriter:
    """Records what a SummaryWriter is asked to do; every instance is kept in ``FakeWriter.made``."""

    made: list["FakeWriter"] = []

    def __init__(self, log_dir: str, purge_step: int | None = None) -> None:
        self.log_dir, self.purge_step = log_dir, purge_step
        self.scalars: list[tuple[str, float, int, float]] = []
        self.flushes, self.closed = 0, False
        FakeWriter.made.append(self)

    def add_scalar(self, tag: str, value: float, global_step: int, walltime: float) -> None:
        self.scalars.append((tag, value, global_step, walltime))

    def flush(self) -> None:
        self.flushes += 1

    def close(self) -> None:
        self.closed = True


@pytest.fixture(autouse=True)
def _fresh_fake():
    FakeWriter.made = []


RECORD = {"step": 1, "wall_time": 10.0, "phase": "grpo", "loss": 0.5, "reward/total": torch.tensor(1.5), "ok": True}


def test_numeric_values_become_scalars_at_the_records_step(tmp_path: Path) -> None:
    log = MetricsLog(tmp_path / "run" / "metrics.jsonl", tensorboard="on", writer_factory=FakeWriter)
    log.write(RECORD)
    log.write({**RECORD, "step": 2, "wall_time": 11.0, "num_loss_tokens": 7})
    (writer,) = FakeWriter.made
    assert writer.log_dir == str(tmp_path / "run" / "tb") and writer.purge_step is None
    assert writer.scalars == [
        ("loss", 0.5, 1, 10.0),
        ("reward/total", 1.5, 1, 10.0),
        ("loss", 0.5, 2, 11.0),
        ("reward/total", 1.5, 2, 11.0),
        ("num_loss_tokens", 7, 2, 11.0),
    ]  # no "phase" (a string), no "ok" (a flag), step and wall_time are the events' own
    assert writer.flushes == 2  # flushed every step
    assert [r["step"] for r in read_metrics(log.path)] == [1, 2]  # the JSONL log is unchanged


def test_truncating_the_log_purges_later_events(tmp_path: Path) -> None:
    log = MetricsLog(tmp_path / "metrics.jsonl", tensorboard="on", writer_factory=FakeWriter)
    log.write(RECORD)
    log.truncate_after(3)
    (first,) = FakeWriter.made
    assert first.closed
    log.write({**RECORD, "step": 4})
    first, second = FakeWriter.made
    assert second.purge_step == 4 and second.log_dir == first.log_dir
    assert second.scalars[0] == ("loss", 0.5, 4, 10.0)


def test_nothing_is_opened_before_the_first_record(tmp_path: Path) -> None:
    """A run that stops before its first step (a refused resume) must leave the run folder as it was."""
    log = MetricsLog(tmp_path / "metrics.jsonl", tensorboard="on", writer_factory=FakeWriter)
    log.truncate_after(0)
    assert FakeWriter.made == [] and not (tmp_path / "tb").exists()


def test_switch_off_auto_on(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert TrainConfig().tensorboard == "auto"  # the default: event files whenever tensorboard is installed
    assert MetricsLog(tmp_path / "a.jsonl", tensorboard="off", writer_factory=FakeWriter).tensorboard is None
    other_rank = MetricsLog(tmp_path / "b.jsonl", enabled=False, tensorboard="on", writer_factory=FakeWriter)
    assert other_rank.tensorboard is None
    assert FakeWriter.made == []  # neither "off" nor a disabled log (ranks other than 0) opens a writer

    monkeypatch.setattr(tb, "tensorboard_available", lambda: False)
    assert MetricsLog(tmp_path / "c.jsonl", tensorboard="auto").tensorboard is None
    for enabled in (True, False):  # every rank refuses "on", so that no rank waits for a stopped rank 0
        with pytest.raises(ConfigError, match="train.tensorboard is 'on' but the tensorboard package"):
            MetricsLog(tmp_path / "d.jsonl", enabled=enabled, tensorboard="on")
    with pytest.raises(ConfigError, match="train.tensorboard must be 'auto', 'on' or 'off'"):
        MetricsLog(tmp_path / "e.jsonl", tensorboard="yes")

    monkeypatch.setattr(tb, "tensorboard_available", lambda: True)
    monkeypatch.setattr(tb, "_summary_writer", FakeWriter)
    auto = MetricsLog(tmp_path / "f.jsonl", tensorboard="auto")
    auto.write(RECORD)
    assert isinstance(auto.tensorboard, tb.TensorBoardLog) and len(FakeWriter.made) == 1


def test_cli_switch_is_checked() -> None:
    @dataclass
    class Cfg:
        train: TrainConfig = field(default_factory=TrainConfig)

    assert load_config(Cfg(), ["--train.tensorboard", "off"]).train.tensorboard == "off"
    with pytest.raises(ConfigError, match="train.tensorboard"):
        load_config(Cfg(), ["--train.tensorboard", "maybe"])


def test_real_event_files_hold_the_scalars(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    log = MetricsLog(tmp_path / "metrics.jsonl", tensorboard="auto")
    for step in (1, 2, 3):
        log.write({"step": step, "wall_time": 100.0 + step, "loss": 1.0 / step})
    log.truncate_after(1)  # a resume from step 1: steps 2 and 3 are written again
    for step in (2, 3):
        log.write({"step": step, "wall_time": 200.0 + step, "loss": 10.0 * step})
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    loss = [(e.step, e.value, e.wall_time) for e in events.Scalars("loss")]
    assert loss == [(1, 1.0, 101.0), (2, 20.0, 202.0), (3, 30.0, 203.0)]
