"""Curves of a run: one panel per metric group, drawn from metrics.jsonl with matplotlib's Agg backend.

A metric's group is the part of its name before the first ``/`` (``reward/format`` and ``reward/answer`` share
the ``reward`` panel; ``time/rollout`` and ``time/update`` the ``time`` panel); names without ``/`` are their own
group. Steps the trainer skipped (non-finite loss or gradient) are marked with red ticks on every panel.
"""

from __future__ import annotations

import math
from pathlib import Path

from engine.train.metrics import read_metrics

_NOT_PLOTTED = {"step", "phase", "epoch", "skipped", "wall_time"}


def metric_groups(records: list[dict[str, object]]) -> dict[str, list[str]]:
    """Group name -> metric names (in first-seen order) of the numeric metrics in ``records``."""
    groups: dict[str, list[str]] = {}
    for record in records:
        for key, value in record.items():
            if key in _NOT_PLOTTED or isinstance(value, bool) or not isinstance(value, (int, float, type(None))):
                continue
            group = key.split("/", 1)[0]
            names = groups.setdefault(group, [])
            if key not in names:
                names.append(key)
    return groups


def plot_curves(metrics_path: str | Path, out_path: str | Path, title: str | None = None) -> Path:
    """Write a PNG with one panel per metric group of ``metrics_path``; returns ``out_path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [r for r in read_metrics(metrics_path) if "step" in r]
    if not records:
        raise ValueError(f"{metrics_path}: no step records to plot")
    groups = metric_groups(records)
    cols = min(3, len(groups)) or 1
    rows = math.ceil(len(groups) / cols) or 1
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 3.4 * rows), squeeze=False)
    skipped = [r["step"] for r in records if r.get("skipped")]
    for ax, (group, names) in zip(axes.flat, groups.items()):
        for name in names:
            points = [(r["step"], r[name]) for r in records if isinstance(r.get(name), (int, float))]
            if points:
                xs, ys = zip(*points)
                ax.plot(xs, ys, label=name.split("/", 1)[-1] if "/" in name else name, linewidth=1.2)
        for step in skipped:
            ax.axvline(step, color="red", alpha=0.3, linewidth=0.8)
        ax.set_title(group)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if len(names) > 1:
            ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(groups) :]:
        ax.axis("off")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_path, dpi=110)
    plt.close(fig)
    return out_path
