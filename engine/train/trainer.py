"""One training loop for SFT and GRPO: accumulate, normalise globally, clip, step, log, checkpoint.

The loop knows nothing about the task. An *objective* turns a micro-batch into a summed loss::

    objective(model, micro_batch) -> ObjectiveOutput(loss_sum, num_loss_units, metrics)

a *batch source* (engine.train.batch_source) yields each step's micro-batches, and a *step function*
``step_fn(trainer, ctx) -> GradStats`` runs one optimiser step (default :func:`supervised_step`; GRPO's,
``engine.rl.step.grpo_step``, also runs the rollouts and rewards, timing them as phases). A step:

1. takes this rank's micro-batches from the batch source (phase ``data`` plus whatever phases the step opens);
2. runs forward + backward of ``loss_sum`` (unnormalised) for each micro-batch; FSDP2 reduce-scatters each
   block's gradient as its backward finishes, averaging over ranks;
3. all-reduces (loss_sum, num_loss_units, num_tokens) over ranks and micro-batches and multiplies the
   gradients by ``world_size / N`` with N the **global** number of loss units, so the update is the gradient of
   ``(sum of every token's loss on every rank) / N``;
4. clips by the global gradient norm, steps AdamW and the LR schedule (:meth:`Trainer.optimizer_step`); the
   loop then logs one JSONL line and checkpoints.

Why normalise by the global count rather than averaging per micro-batch: with packed sequences micro-batches and
ranks hold different numbers of loss tokens. A mean of per-micro-batch means weights a token in a short
micro-batch more than one in a long one, and the weighting changes with how a batch happens to be split over
ranks and accumulation steps — the gradient would depend on the parallel layout. Dividing the summed loss by
the summed count makes it exactly the gradient of the whole batch's token mean, identical for 1 process with
accumulation k·n and n processes with accumulation k (tested). The count is only known after the objective has
run, so the division is applied to the gradients once after the last backward (it is folded into the clipping
multiply — one pass over the gradient shards). Objectives that average per sequence (GRPO's default) return the
sum of per-sequence means as ``loss_sum`` and the number of sequences as ``num_loss_units`` (the metrics line
logs the global count as ``num_loss_tokens``).

A step whose global loss or gradient norm is NaN/inf is skipped (no optimiser update, gradients dropped), warned
about and counted; ``max_consecutive_nonfinite`` skips in a row stop the run with NonFiniteError. All ranks take
the same decision because both figures are global.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor

from engine.config import TrainConfig, to_dict
from engine.distributed import DistEnv, all_reduce_max, all_reduce_sum, init_distributed, parallelize
from engine.train.batch_source import BatchSource, StepContext
from engine.train.metrics import MetricsLog, PhaseTimer, mean_across_ranks
from engine.train.optim import build_optimizer, build_scheduler


@dataclass
class ObjectiveOutput:
    """One micro-batch's contribution.

    loss_sum: scalar tensor (graph attached), the *sum* of the loss over this micro-batch's loss units.
    num_loss_units: the number of loss units summed (tokens, or sequences for per-sequence means); int or
        integer tensor.
    metrics: figures to log (averaged over micro-batches, then over ranks).
    num_tokens: tokens processed by the forward, for tokens/s (default: num_loss_units).
    """

    loss_sum: torch.Tensor
    num_loss_units: int | torch.Tensor
    metrics: dict[str, float | torch.Tensor] = field(default_factory=dict)
    num_tokens: int | torch.Tensor | None = None


Objective = Callable[[nn.Module, Any], ObjectiveOutput]
StepFn = Callable[["Trainer", StepContext], "GradStats"]


class NonFiniteError(RuntimeError):
    """Too many consecutive steps had a non-finite loss or gradient; ``record`` is the last step's metrics line."""

    record: dict[str, Any] | None = None


def seed_all(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and every CUDA device)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)  # noqa: NPY002 (the global stream libraries draw from)
    torch.manual_seed(seed)


@dataclass
class GradStats:
    """Global figures of one step's gradient computation (identical on every rank)."""

    loss: float  # sum of loss over all ranks and micro-batches / num_loss_units
    grad_norm: float  # global L2 norm of the normalised gradient, before clipping
    num_loss_units: float
    num_tokens: float
    metrics: dict[str, float]  # this rank's objective metrics, averaged over its micro-batches

    @property
    def finite(self) -> bool:
        return math.isfinite(self.loss) and math.isfinite(self.grad_norm)


@dataclass
class TrainResult:
    """What ``fit`` ends with."""

    step: int
    last_metrics: dict[str, Any]
    num_skipped: int
    checkpoint_dir: Path | None
    export_dir: Path | None


class Trainer:
    """The loop. Construct after the model is built (and LoRA applied); it is sharded here if not yet.

    model: an nn.Module with fp32 trainable parameters, identical on every rank (same init or checkpoint).
    objective: ``(model, micro_batch) -> ObjectiveOutput``.
    batch_source: see engine.train.batch_source.BatchSource.
    cfg: the ``train`` section of the run config.
    env: process group / mesh (default: ``init_distributed()``).
    phase: ``"sft"`` or ``"grpo"``, written on every metrics line.
    run_config: the full run config as a dict, saved as ``<run dir>/config.json`` when ``fit`` starts (after a
        resume was accepted) and in every checkpoint.
    total_steps: overrides ``cfg.max_steps`` / epochs x ``batch_source.steps_per_epoch``.
    step_fn: ``(trainer, ctx) -> GradStats``, one optimiser step (default :func:`supervised_step`).
    export_fn: ``(out_dir) -> None`` on rank 0 after the final HF export has streamed the LoRA-merged weights
        (sharded safetensors + index, in ``cfg.export_dtype``; config.json for a VLModel; see
        engine.train.checkpoint.export_hf): the files beside them, e.g. tokenizer and preprocessor.

    RNG: every rank is seeded with ``cfg.seed + rank`` here (distinct dropout masks and samples per rank); a
    resume restores the saved streams instead.
    """

    def __init__(
        self,
        model: nn.Module,
        objective: Objective,
        batch_source: BatchSource,
        cfg: TrainConfig,
        *,
        env: DistEnv | None = None,
        phase: str = "sft",
        run_config: dict[str, Any] | None = None,
        total_steps: int | None = None,
        step_fn: StepFn | None = None,
        export_fn: Callable[[Path], None] | None = None,
    ) -> None:
        from engine.train.checkpoint import Checkpointer

        self.env = env or init_distributed()
        self.cfg = cfg
        self.phase = phase
        self.objective = objective
        self.batch_source = batch_source
        self.step_fn = step_fn or supervised_step
        self.export_fn = export_fn
        if not isinstance(model, FSDPModule):
            model = parallelize(
                model,
                self.env.data_parallel_mesh(cfg.dp_replicate),
                activation_checkpointing=cfg.activation_checkpointing,
                reshard_after_forward=cfg.reshard_after_forward,
            )
        self.model = model
        self.total_steps = total_steps or self._budget()
        self.optimizer = build_optimizer(model, cfg)
        self._fresh_groups = [{k: v for k, v in g.items() if k != "params"} for g in self.optimizer.param_groups]
        self.scheduler = build_scheduler(self.optimizer, cfg, self.total_steps)
        self.params = [p for g in self.optimizer.param_groups for p in g["params"]]
        self.step = 0
        self.num_skipped = 0
        self.consecutive_nonfinite = 0
        self.timer = PhaseTimer()
        self.run_dir = Path(cfg.output_dir) / cfg.run_name
        self.metrics_log = MetricsLog(self.run_dir / "metrics.jsonl", self.env.is_main, cfg.tensorboard)
        self.checkpointer = Checkpointer(
            self.run_dir / "checkpoints", keep_last=cfg.keep_last, env=self.env, save_frozen=cfg.checkpoint_frozen
        )
        self.run_config = run_config if run_config is not None else {"train": to_dict(cfg)}
        self._write_config = run_config is not None
        self.resumed_from: Path | None = None
        seed_all(cfg.seed + self.env.rank)

    def _budget(self) -> int:
        if self.cfg.max_steps > 0:
            return self.cfg.max_steps
        per_epoch = getattr(self.batch_source, "steps_per_epoch", None)
        if not per_epoch:
            raise ValueError("set train.max_steps: the batch source has no steps_per_epoch to derive it from epochs")
        return int(per_epoch) * self.cfg.epochs

    # ------------------------------------------------------------------------------------------------------
    # one step

    def train_step(self) -> dict[str, Any]:
        """Run one optimiser step; returns the metrics record written to metrics.jsonl."""
        self.timer.reset()
        start = time.perf_counter()
        ctx = StepContext(
            self.model, self.step, self.env.rank, self.env.world_size, self.env.device, self.timer, metrics={}
        )
        lr = self.scheduler.get_last_lr()[0]
        stats = self.step_fn(self, ctx)
        self.step += 1
        step_time = time.perf_counter() - start
        local = dict(stats.metrics)
        local.update(ctx.metrics)
        local.update({f"time/{name}": sec for name, sec in self.timer.seconds.items()})
        record: dict[str, Any] = {
            "step": self.step,
            "phase": self.phase,
            "wall_time": time.time(),
            "loss": stats.loss,
            "grad_norm": stats.grad_norm,
            "lr": lr,
            "num_loss_tokens": stats.num_loss_units,
            "tokens_per_s": stats.num_tokens / step_time,
            "skipped": not stats.finite,
        }
        record.update(mean_across_ranks(local, self.env.device))
        record["time/step"] = step_time
        try:
            self._account_nonfinite(stats)
        except NonFiniteError as exc:
            exc.record = record  # fit logs the step that stops the run
            raise
        return record

    def compute_gradients(self, micro_batches: list[Any]) -> GradStats:
        """Forward + backward every micro-batch, normalise by the global loss-unit count, clip.

        Leaves the final (normalised, clipped) gradients in ``.grad`` — sharded DTensors under FSDP2 — without
        stepping the optimiser. Collective: every rank must pass the same number of micro-batches.
        """
        self._check_same_count(len(micro_batches))
        self.model.train()
        totals = torch.zeros(3, dtype=torch.float64, device=self.env.device)  # loss_sum, count, tokens
        metric_sums: dict[str, float | torch.Tensor] = {}
        for micro_batch in micro_batches:
            out = self.objective(self.model, micro_batch)
            out.loss_sum.backward()
            totals[0] += out.loss_sum.detach().double()
            totals[1] += _on_device(out.num_loss_units, totals)
            totals[2] += _on_device(out.num_tokens if out.num_tokens is not None else out.num_loss_units, totals)
            for key, value in out.metrics.items():
                value = value.detach().double() if isinstance(value, torch.Tensor) else float(value)
                metric_sums[key] = metric_sums.get(key, 0.0) + value
        all_reduce_sum(totals)
        loss_total, count, tokens = totals.tolist()
        loss = loss_total / count if count > 0 else float("nan")
        grad_norm = self._normalise_and_clip(self.env.world_size / count if count > 0 else float("nan"))
        metrics = {k: float(v) / len(micro_batches) for k, v in metric_sums.items()}
        return GradStats(loss, grad_norm, count, tokens, metrics)

    def optimizer_step(self, stats: GradStats) -> None:
        """Step AdamW on the gradients ``compute_gradients`` left (unless the step is non-finite), drop them, and
        advance the LR schedule."""
        if stats.finite:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()

    def _check_same_count(self, n: int) -> None:
        """Every rank must run the same number of backward passes (FSDP collectives pair up across ranks)."""
        counts = torch.tensor([n, -n], dtype=torch.int64, device=self.env.device)
        all_reduce_max(counts)
        if n == 0 or counts[0].item() != n or -counts[1].item() != n:
            raise RuntimeError(
                f"rank {self.env.rank}: batch source gave {n} micro-batches at step {self.step}; every rank must "
                f"give the same non-zero number (range over ranks: {-counts[1].item()}..{counts[0].item()})"
            )

    def _normalise_and_clip(self, scale: float) -> float:
        """Multiply grads by ``scale`` and clip to ``cfg.grad_clip`` in one pass; returns the scaled global norm."""
        grads = [p.grad for p in self.params if p.grad is not None]
        if not grads:
            return float("nan")
        raw = torch.nn.utils.get_total_norm(grads, norm_type=2.0, foreach=True)
        if isinstance(raw, DTensor):
            raw = raw.full_tensor()
        norm = raw.item() * scale
        coef = scale
        if self.cfg.grad_clip > 0 and math.isfinite(norm) and norm > self.cfg.grad_clip:
            coef *= self.cfg.grad_clip / (norm + 1e-6)
        if math.isfinite(coef):
            torch._foreach_mul_(grads, coef)
        return norm

    def _account_nonfinite(self, stats: GradStats) -> None:
        if stats.finite:
            self.consecutive_nonfinite = 0
            return
        self.num_skipped += 1
        self.consecutive_nonfinite += 1
        why = (
            "no loss tokens in the global batch"
            if stats.num_loss_units <= 0
            else f"loss={stats.loss} grad_norm={stats.grad_norm}"
        )
        if self.env.is_main:
            warnings.warn(
                f"step {self.step}: skipped the update ({why}); {self.num_skipped} skipped so far, "
                f"{self.consecutive_nonfinite} in a row",
                RuntimeWarning,
                stacklevel=3,
            )
        if self.consecutive_nonfinite >= self.cfg.max_consecutive_nonfinite:
            raise NonFiniteError(
                f"stopping at step {self.step}: {self.consecutive_nonfinite} consecutive steps with a non-finite "
                f"loss or gradient (last: {why}); lower train.lr, check the data, or raise "
                f"train.max_consecutive_nonfinite"
            )

    # ------------------------------------------------------------------------------------------------------
    # the run

    @property
    def global_batch(self) -> int:
        """Items per optimiser step over all ranks: the batch source's ``global_batch`` if it has one (an
        IndexedBatchSource: micro_batch_size x grad_accum_steps x world size), else the same from ``cfg``."""
        found = getattr(self.batch_source, "global_batch", None)
        return int(found) if found else self.cfg.micro_batch_size * self.cfg.grad_accum_steps * self.env.world_size

    def state(self) -> dict[str, Any]:
        """The trainer's own resumable state (JSON-serialisable), with the run's config and global batch."""
        return {
            "step": self.step,
            "num_skipped": self.num_skipped,
            "consecutive_nonfinite": self.consecutive_nonfinite,
            "total_steps": self.total_steps,
            "phase": self.phase,
            "scheduler": self.scheduler.state_dict(),
            "data": self.batch_source.state_dict(),
            "config": self.run_config,
            "global_batch": self.global_batch,
        }

    def load_state(self, state: dict[str, Any], reschedule: bool = False) -> None:
        """Restore the trainer state; ``reschedule``: keep this run's (new) schedule, positioned at the step."""
        self.step = int(state["step"])
        self.num_skipped = int(state["num_skipped"])
        self.consecutive_nonfinite = int(state["consecutive_nonfinite"])
        if reschedule:
            lam = self.scheduler.lr_lambdas[0]
            lrs = [base * lam(self.step) for base in self.scheduler.base_lrs]
            for group, lr, base in zip(self.optimizer.param_groups, lrs, self.scheduler.base_lrs):
                group["lr"], group["initial_lr"] = lr, base
            self.scheduler.last_epoch = self.step
            self.scheduler._last_lr = lrs
        else:
            self.scheduler.load_state_dict(state["scheduler"])
        self.batch_source.load_state_dict(state["data"])

    def save_checkpoint(self) -> Path:
        return self.checkpointer.save(self.step, self.model, self.optimizer, self.state())

    def resume(self) -> bool:
        """Load the newest checkpoint that verifies and loads, applying or refusing config changes (see
        engine.train.resume); False (with a warning) if there is no checkpoint at all. Raises ResumeError, with
        nothing changed on disk, when every checkpoint is broken or a change cannot be applied."""
        loaded = self.checkpointer.load_latest(self.model, self.optimizer)
        if loaded is None:
            if self.env.is_main:
                warnings.warn(f"--resume: no checkpoint under {self.checkpointer.root}; starting fresh", stacklevel=2)
                self.metrics_log.set_aside()
            return False
        path, state = loaded
        reschedule = self._check_changes(path, state)
        self.load_state(state, reschedule=reschedule)
        self.resumed_from = path
        self.metrics_log.truncate_after(self.step)
        if self.env.is_main:
            print(f"[resume] {self.phase}: loaded {path} (step {self.step} of {self.total_steps})", flush=True)
        return True

    def _check_changes(self, path: Path, state: dict[str, Any]) -> bool:
        """Report every config difference from the checkpoint; apply them by the rules or raise ResumeError.
        Returns whether the lr schedule has to be rebuilt."""
        from engine.train.checkpoint import ResumeError
        from engine.train.resume import Change, classify

        saved = state.get("config")
        if saved is None:
            if self.env.is_main:
                warnings.warn(f"{path.name} records no config (an older checkpoint): changes cannot be checked",
                              stacklevel=3)  # fmt: skip
            return False
        changes = classify(saved, self.run_config, self.cfg.resume_accept)
        if state.get("total_steps") != self.total_steps and not any(c.kind == "schedule" for c in changes):
            changes.append(Change("total steps", state.get("total_steps"), self.total_steps, "schedule"))
        old_batch = state.get("global_batch")
        if old_batch is not None and old_batch != self.global_batch:
            per_rank = self.cfg.micro_batch_size * self.env.world_size
            hint = (
                f"; keep it with --train.grad_accum_steps {old_batch // per_rank}" if old_batch % per_rank == 0 else ""
            )
            note = f"micro_batch_size x grad_accum_steps x world size {self.env.world_size}: other data per step{hint}"
            changes.append(Change("global batch", old_batch, self.global_batch, "refused", note))
        elif state.get("world_size") != self.env.world_size:
            note = "applied: the same global batch, tensors resharded"
            changes.append(Change("world size", state.get("world_size"), self.env.world_size, "applied", note))
        if self.total_steps < int(state["step"]):
            changes.append(Change("total steps", state.get("total_steps"), self.total_steps, "refused",
                                  f"below the checkpoint's step {state['step']}"))  # fmt: skip
        refused = [c for c in changes if c.kind == "refused"]
        if refused:
            raise ResumeError(
                f"--resume refused: the config differs from {path} in what a run in progress cannot change; "
                f"nothing was changed:\n" + "\n".join(c.line() for c in refused) + "\nPut the old values back, "
                "accept them with --train.resume_accept KEY,..., or start a new run (another --train.run_name)."
            )
        if changes and self.env.is_main:
            print(f"[resume] the config differs from {path.name}:\n" + "\n".join(c.line() for c in changes),
                  flush=True)  # fmt: skip
        for change in changes:
            if change.kind == "optimizer":
                from engine.train.resume import OPTIMIZER

                name = OPTIMIZER[change.key]
                for group, fresh in zip(self.optimizer.param_groups, self._fresh_groups):
                    group[name] = fresh[name]
        return any(c.kind == "schedule" for c in changes)

    def _save_unless_nonfinite(self, due: bool, pending: bool) -> tuple[Path | None, bool]:
        """Save a due (or deferred) checkpoint unless the step is inside a non-finite streak, whose weights must
        not become the newest checkpoint; then it is deferred to the next finite step. Returns (path, pending)."""
        if not (due or pending):
            return None, False
        if self.consecutive_nonfinite:
            if due and self.env.is_main:
                warnings.warn(
                    f"step {self.step}: checkpoint deferred: the last {self.consecutive_nonfinite} step(s) were "
                    f"non-finite; it is written at the next finite step",
                    RuntimeWarning,
                    stacklevel=3,
                )
            return None, True
        return self.save_checkpoint(), False

    def fit(self) -> TrainResult:
        """Train until ``total_steps`` (resuming first if ``cfg.resume``); checkpoint, export and plot at the end."""
        from tqdm.auto import tqdm

        from engine.train.checkpoint import export_hf

        if not (self.cfg.resume and self.resume()):
            self.metrics_log.truncate_after(self.step)  # a fresh run starts a fresh curve
        if self.env.is_main and self._write_config:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.json").write_text(json.dumps(self.run_config, indent=2) + "\n")
        finished_before = self.resumed_from is not None and self.step >= self.total_steps
        bar = tqdm(
            total=self.total_steps,
            initial=self.step,
            desc=f"{self.phase} {self.cfg.run_name}",
            disable=not (self.env.is_main and self.cfg.progress_bar),
            dynamic_ncols=True,
        )
        record: dict[str, Any] = {}
        last_ckpt = self.resumed_from if finished_before else None
        pending = False
        with bar:
            while self.step < self.total_steps:
                try:
                    record = self.train_step()
                except NonFiniteError as exc:
                    if exc.record is not None:
                        self.metrics_log.write(exc.record)
                    raise
                if self.step % self.cfg.log_every == 0 or self.step == self.total_steps:
                    self.metrics_log.write(record)
                bar.update(1)
                postfix = {"loss": f"{record['loss']:.4g}", "lr": f"{record['lr']:.2e}"}
                postfix["gnorm"] = f"{record['grad_norm']:.3g}"
                if "reward/total" in record:
                    postfix["reward"] = f"{record['reward/total']:.3g}"
                bar.set_postfix(postfix)
                every = self.cfg.checkpoint_every
                due = (every > 0 and self.step % every == 0) or self.step == self.total_steps
                saved, pending = self._save_unless_nonfinite(due, pending)
                last_ckpt = saved or last_ckpt
        if pending and self.env.is_main:
            warnings.warn(
                f"step {self.step}: the run ended inside a non-finite streak: no final checkpoint (the newest is "
                f"{last_ckpt.name if last_ckpt else 'none'})",
                RuntimeWarning,
                stacklevel=2,
            )
        export_dir = None
        if self.cfg.export_hf:
            export_dir = self.run_dir / "hf"
            done = finished_export(self.run_dir)
            if finished_before and done is not None and done.get("step") == self.step:
                if self.env.is_main:
                    print(f"[resume] {self.phase}: already finished; keeping the export {export_dir}", flush=True)
            else:
                if self.env.is_main:
                    (export_dir / EXPORT_MARKER).unlink(missing_ok=True)
                export_hf(
                    self.model,
                    export_dir,
                    env=self.env,
                    dtype=getattr(torch, self.cfg.export_dtype),
                    max_shard_bytes=self.cfg.export_max_shard_mb << 20,
                    write_extra=self.export_fn,
                )
                if self.env.is_main:
                    marker = {"step": self.step, "phase": self.phase, "config": self.run_config}
                    _write_marker(export_dir / EXPORT_MARKER, marker)
                self.env.barrier()
        if self.cfg.plot and self.env.is_main and self.metrics_log.path.exists():
            from engine.train.plot import plot_curves

            plot_curves(self.metrics_log.path, self.run_dir / "curves.png", title=f"{self.cfg.run_name} ({self.phase})")
        return TrainResult(self.step, record, self.num_skipped, last_ckpt, export_dir)


def supervised_step(trainer: Trainer, ctx: StepContext) -> GradStats:
    """The default step: the batch source's micro-batches, their gradients, the optimiser step."""
    with ctx.timer("data"):
        micro_batches = trainer.batch_source.next_step(ctx)
    with ctx.timer("update"):
        stats = trainer.compute_gradients(micro_batches)
        trainer.optimizer_step(stats)
    return stats


EXPORT_MARKER = "export.json"


def finished_export(run_dir: str | Path) -> dict[str, Any] | None:
    """The marker a finished run writes after its HF export (``<run_dir>/hf/export.json``: step, phase, the run's
    config), or None when the export is missing or incomplete."""
    path = Path(run_dir) / "hf" / EXPORT_MARKER
    try:
        marker = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) else None


def _write_marker(path: Path, marker: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(json.dumps(marker, indent=1) + "\n")
    os.replace(tmp, path)


def _on_device(value: int | float | torch.Tensor, like: torch.Tensor) -> torch.Tensor | float:
    """A scalar count as a float64 tensor on ``like``'s device (no host sync), or a Python float."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"ObjectiveOutput counts must be scalars, got a tensor of shape {tuple(value.shape)}")
        return value.detach().to(device=like.device, dtype=torch.float64).reshape(())
    return float(value)
