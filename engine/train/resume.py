"""What a resume does with a config that differs from the checkpoint's: the documented rules (docs/robustness.md).

A checkpoint records the run's whole config (the recipe's, or the ``train`` section alone) and its global batch
(``micro_batch_size x grad_accum_steps x world size``). On resume every difference is reported, and each changed
key falls in one class:

* ``applied`` — settings that only steer logging, checkpointing, export, memory layout or the stopping rule, and
  take effect from the resumed step: output folder and run name, ``log_every``, ``progress_bar``, ``plot``,
  ``tensorboard``, ``checkpoint_every``, ``keep_last``, ``checkpoint_frozen``, ``export_hf``, ``export_dtype``,
  ``activation_checkpointing``, ``reshard_after_forward``, ``grad_clip``, ``max_consecutive_nonfinite``,
  ``data.eval_path``, ``data.max_skip_share``, ``rl.decode``, ``rl.judge_url`` and the recipe's printing
  (``summary_window``, ``probe_prompts``);
* ``schedule`` — ``train.lr``, ``min_lr_ratio``, ``schedule``, ``warmup_ratio``, ``max_steps``, ``epochs`` (the
  number of steps), ``weight_decay``, ``betas``, ``eps``: the learning-rate schedule is rebuilt from the new
  settings and continues at the resumed step (lr = new schedule at that step), the optimiser's hyper-parameters
  are set to the new values; its moments are kept. A step budget below the resumed step is refused;
* ``refused`` — everything else (the data, the model, LoRA, the seed, the RL objective and sampling, another
  section such as the warm-up ``sft.*`` of ``grpo_sif.py``), and a changed global batch. A changed world size,
  ``micro_batch_size`` or ``grad_accum_steps`` that keeps the global batch is applied: each step sees the same
  records (the tensors reshard; on another world size the RNG streams are re-seeded). ``train.resume_accept``
  lists keys, or sections such as ``rl``, whose changes are accepted as given.

A key present on one side only (a setting the engine added or removed since the save) is reported and applied
with its default. ``train.resume`` and ``train.resume_accept`` themselves are never compared.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

NOT_COMPARED = ("train.resume", "train.resume_accept")

APPLIED = {
    "train.output_dir", "train.run_name", "train.log_every", "train.progress_bar", "train.plot", "train.tensorboard",
    "train.checkpoint_every", "train.keep_last", "train.checkpoint_frozen", "train.export_hf", "train.export_dtype",
    "train.activation_checkpointing", "train.reshard_after_forward", "train.grad_clip",
    "train.max_consecutive_nonfinite", "data.eval_path", "data.max_skip_share", "rl.decode", "rl.judge_url",
    "summary_window", "probe_prompts",
}  # fmt: skip

BATCH = {"train.micro_batch_size", "train.grad_accum_steps"}  # applied when the global batch is unchanged
SCHEDULE = {"train.lr", "train.min_lr_ratio", "train.schedule", "train.warmup_ratio", "train.max_steps", "train.epochs"}
OPTIMIZER = {"train.weight_decay": "weight_decay", "train.betas": "betas", "train.eps": "eps"}


@dataclass
class Change:
    key: str
    old: Any
    new: Any
    kind: str  # "applied" | "schedule" | "optimizer" | "accepted" | "refused"
    note: str = ""

    def line(self) -> str:
        what = {
            "applied": "applied",
            "schedule": "applied: the lr schedule is rebuilt and continues at the resumed step",
            "optimizer": "applied to the optimiser from the resumed step (its moments are kept)",
            "accepted": "accepted as given (train.resume_accept)",
            "refused": "cannot be applied to a run in progress",
        }[self.kind]
        return f"  {self.key}: {self.old!r} -> {self.new!r} ({self.note or what})"


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """``{"train": {"lr": 1}}`` -> ``{"train.lr": 1}`` (lists stay values)."""
    if not isinstance(tree, dict):
        return {prefix.rstrip("."): tree}
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


_MISSING = "<absent>"


def _accepted(key: str, accept: tuple[str, ...] | list[str]) -> bool:
    return any(key == a or key.startswith(a.rstrip(".") + ".") for a in accept)


def classify(saved: dict[str, Any], current: dict[str, Any], accept: tuple[str, ...] | list[str] = ()) -> list[Change]:
    """Every differing key of two (nested) configs, classified by the rules above."""
    old, new = flatten(saved), flatten(current)
    changes = []
    for key in sorted(set(old) | set(new)):
        if key.endswith(NOT_COMPARED) or old.get(key, _MISSING) == new.get(key, _MISSING):
            continue
        note = ""
        if key not in old:  # a setting the engine added since the save: its default applies
            kind, note = "applied", "applied: not a setting when the checkpoint was written"
        elif key not in new:
            kind, note = "applied", "applied: no longer a setting"
        elif key in APPLIED or key.removeprefix("sft.") in APPLIED:
            kind = "applied"
        elif key in BATCH:
            kind = "applied"
        elif key in SCHEDULE:
            kind = "schedule"
        elif key in OPTIMIZER:
            kind = "optimizer"
        elif _accepted(key, accept):
            kind = "accepted"
        else:
            kind = "refused"
        changes.append(Change(key, old.get(key, _MISSING), new.get(key, _MISSING), kind, note))
    return changes
