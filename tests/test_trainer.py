"""The loop on one process: non-finite steps, metrics lines and phases, schedule, optimiser groups, plots."""

import contextlib
import json
import math
import time
import warnings

import pytest
import torch
from _toys import SkewedClock, ToyVLM, collate, make_dataset, token_ce_objective

import engine.train.tensorboard as tensorboard_module
from engine.config import ConfigError, TrainConfig
from engine.distributed import init_distributed
from engine.train import IndexedBatchSource, NonFiniteError, ObjectiveOutput, PhaseTimer, Trainer, read_metrics
from engine.train.optim import WarmupDecay
from engine.train.plot import metric_groups


@pytest.fixture
def env():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: thread hand-offs would dominate on a shared 2-core machine
    try:
        with init_distributed("cpu") as env:
            yield env
    finally:
        torch.set_num_threads(threads)


def _cfg(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path), run_name="r", lr=1e-2, max_steps=6, progress_bar=False, export_hf=False)
    return TrainConfig(**{**base, **kw})


def _source():
    return IndexedBatchSource(make_dataset(16), micro_batch_size=2, grad_accum_steps=2, collate=collate)


def _full_params(model):
    return {n: p.full_tensor().clone() for n, p in model.named_parameters()}


class FaultyObjective:
    """Token CE, except at the listed steps: a NaN loss, or a finite loss whose gradient is NaN."""

    def __init__(self, nan_loss_steps=(), nan_grad_steps=()):
        self.nan_loss_steps, self.nan_grad_steps = set(nan_loss_steps), set(nan_grad_steps)
        self.step = 0

    def __call__(self, model, batch):
        out = token_ce_objective(model, batch)
        if self.step in self.nan_loss_steps:
            out.loss_sum = out.loss_sum * float("nan")
        if self.step in self.nan_grad_steps:
            logits = model(batch["ids"][:, :-1], batch["image"])
            out.loss_sum = out.loss_sum + torch.sqrt(((logits - logits.detach()) ** 2).sum())  # value +0, grad NaN
        return out


def test_nonfinite_loss_or_grad_skips_the_step_and_too_many_stop(tmp_path, env):
    objective = FaultyObjective(nan_loss_steps={1}, nan_grad_steps={2})
    trainer = Trainer(ToyVLM(), objective, _source(), _cfg(tmp_path, max_consecutive_nonfinite=3), env=env)
    records = []
    for step in range(4):
        objective.step = step
        before = _full_params(trainer.model)
        with pytest.warns(RuntimeWarning, match=f"step {step + 1}: skipped") if step in (1, 2) else _no_warning():
            records.append(trainer.train_step())
        after = _full_params(trainer.model)
        changed = any(not torch.equal(before[n], after[n]) for n in before)
        assert changed == (step not in (1, 2)), step
    assert [r["skipped"] for r in records] == [False, True, True, False]
    assert math.isnan(records[1]["loss"]) and math.isfinite(records[2]["loss"]) and math.isnan(records[2]["grad_norm"])
    assert trainer.num_skipped == 2 and trainer.consecutive_nonfinite == 0

    objective.nan_loss_steps = set(range(4, 100))
    with pytest.warns(RuntimeWarning), pytest.raises(NonFiniteError, match="3 consecutive steps with a non-finite"):
        for step in range(4, 10):
            objective.step = step
            trainer.train_step()
    assert trainer.step == 7 and trainer.num_skipped == 5


@contextlib.contextmanager
def _no_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        yield


class TimedSource:
    """A GRPO-like source: 'rollout' and 'reward' phases (sleeps of ``clock``), a reward figure in ctx.metrics."""

    def __init__(self, clock: SkewedClock):
        self.inner = _source()
        self.clock = clock

    steps_per_epoch = 4

    def next_step(self, ctx):
        with ctx.timer("rollout"):
            self.clock.sleep(0.02)
            with ctx.timer("reward"):
                self.clock.sleep(0.01)
        ctx.metrics["reward/total"] = 0.5 + ctx.step
        return self.inner.next_step(ctx)

    def state_dict(self):
        return self.inner.state_dict()

    def load_state_dict(self, state):
        self.inner.load_state_dict(state)


@pytest.fixture
def clock(monkeypatch):
    """time.perf_counter (the trainer's and the phase timer's clock) replaced by a SkewedClock."""
    fake = SkewedClock()
    monkeypatch.setattr(time, "perf_counter", fake.perf_counter)
    return fake


def test_metrics_lines_phases_and_curves(tmp_path, env, clock):
    cfg = _cfg(tmp_path, max_steps=0, epochs=1, run_name="grpo_run")
    source = TimedSource(clock)
    trainer = Trainer(ToyVLM(), token_ce_objective, source, cfg, env=env, phase="grpo", run_config={"a": 1})
    result = trainer.fit()
    assert result.step == 4 and trainer.total_steps == 4  # epochs x steps_per_epoch
    run = tmp_path / "grpo_run"
    records = read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    for i, record in enumerate(records):
        assert record["phase"] == "grpo" and record["reward/total"] == 0.5 + i
        assert record["time/reward"] >= 0.01 and record["time/rollout"] >= 0.02  # exclusive: rollout minus reward
        phases = sum(v for k, v in record.items() if k.startswith("time/") and k != "time/step")
        assert phases <= record["time/step"] < phases + 0.05 + 0.1 * record["time/step"]
        assert record["tokens_per_s"] == pytest.approx(record["num_loss_tokens"] / record["time/step"])
        for key in ("loss", "grad_norm", "lr", "mean_logit"):
            assert math.isfinite(record[key])
    assert records[-1]["loss"] < records[0]["loss"]
    assert (run / "curves.png").stat().st_size > 10_000
    assert {"reward", "time", "loss", "lr"} <= set(metric_groups(records))
    assert "wall_time" not in metric_groups(records) and records[-1]["wall_time"] > records[0]["wall_time"]
    assert json.loads((run / "config.json").read_text()) == {"a": 1}

    # A fresh (non-resumed) run under the same name starts a fresh curve.
    cfg.plot = False
    Trainer(ToyVLM(), token_ce_objective, TimedSource(clock), cfg, env=env, phase="grpo").fit()
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl")] == [1, 2, 3, 4]


def test_resume_without_checkpoint_warns_and_starts_fresh(tmp_path, env):
    trainer = Trainer(ToyVLM(), token_ce_objective, _source(), _cfg(tmp_path, resume=True, max_steps=1), env=env)
    with pytest.warns(UserWarning, match="no checkpoint under"):
        assert trainer.fit().step == 1


def test_warmup_cosine_schedule_values():
    sched = WarmupDecay(total_steps=10, warmup_steps=2, schedule="cosine", min_ratio=0.1)
    expected = {0: 1 / 3, 1: 2 / 3, 2: 1.0, 6: 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)), 10: 0.1}
    for step, value in expected.items():
        assert sched(step) == pytest.approx(value)
    linear = WarmupDecay(total_steps=10, warmup_steps=0, schedule="linear", min_ratio=0.0)
    assert [linear(s) for s in (0, 5, 10)] == pytest.approx([1.0, 0.5, 0.0])


def test_weight_decay_skips_vectors_and_frozen_params(tmp_path, env):
    model = ToyVLM()
    model.vision_tower.requires_grad_(False)
    trainer = Trainer(model, token_ce_objective, _source(), _cfg(tmp_path, weight_decay=0.1), env=env)
    by_id = {id(p): n for n, p in trainer.model.named_parameters()}
    decay, no_decay = trainer.optimizer.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(by_id[id(p)].endswith("weight") and p.ndim == 2 for p in decay["params"])
    assert {by_id[id(p)] for p in no_decay["params"]} >= {"norm.weight", "norm.bias", "layers.0.up_proj.bias"}
    assert not any(by_id[id(p)].startswith("vision_tower") for g in (decay, no_decay) for p in g["params"])


def test_phase_timer_is_exclusive(clock):
    timer = PhaseTimer(sync_cuda=False)
    start = time.perf_counter()
    with timer("outer"):
        clock.sleep(0.02)
        with timer("inner"):
            clock.sleep(0.03)
    total = time.perf_counter() - start
    assert timer.seconds["inner"] >= 0.03 and 0.02 <= timer.seconds["outer"] < 0.03 + 0.02
    assert timer.seconds["inner"] + timer.seconds["outer"] == pytest.approx(total, abs=5e-3)


def test_objective_counts_must_be_scalars(tmp_path, env):
    def bad(model, batch):
        out = token_ce_objective(model, batch)
        return ObjectiveOutput(out.loss_sum, batch["mask"].sum(dim=1))

    trainer = Trainer(ToyVLM(), bad, _source(), _cfg(tmp_path), env=env)
    with pytest.raises(ValueError, match="must be scalars"):
        trainer.train_step()


def test_trainer_writes_tensorboard_scalars_by_default_when_installed(tmp_path, env, monkeypatch):
    written = []

    class Writer:
        def __init__(self, log_dir, purge_step=None):
            self.log_dir = log_dir

        def add_scalar(self, tag, value, global_step, walltime):
            written.append((self.log_dir, tag, global_step))

        def flush(self):
            pass

        def close(self):
            pass

    monkeypatch.setattr(tensorboard_module, "tensorboard_available", lambda: True)
    monkeypatch.setattr(tensorboard_module, "_summary_writer", Writer)
    Trainer(ToyVLM(), token_ce_objective, _source(), _cfg(tmp_path, max_steps=2), env=env).fit()
    run_tb = str(tmp_path / "r" / "tb")
    assert sorted((d, step) for d, tag, step in written if tag == "loss") == [(run_tb, 1), (run_tb, 2)]

    written.clear()
    Trainer(ToyVLM(), token_ce_objective, _source(), _cfg(tmp_path, max_steps=2, tensorboard="off"), env=env).fit()
    assert written == []


def test_tensorboard_on_without_the_package_stops_the_trainer(tmp_path, env, monkeypatch):
    monkeypatch.setattr(tensorboard_module, "tensorboard_available", lambda: False)
    with pytest.raises(ConfigError, match="train.tensorboard is 'on'"):
        Trainer(ToyVLM(), token_ce_objective, _source(), _cfg(tmp_path, tensorboard="on"), env=env)
