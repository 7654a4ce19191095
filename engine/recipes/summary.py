"""The printed summaries of the SIF jobs: first-vs-last means of logged metrics."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from engine.train.metrics import read_metrics


def window_means(metrics_path: Path, keys: Sequence[str], window: int) -> tuple[dict[str, float], dict[str, float]]:
    """Means of ``keys`` over the first and the last ``window`` logged steps (NaN where a key is absent)."""
    rows = read_metrics(metrics_path)

    def mean(part: list[dict], key: str) -> float:
        vals = [float(r[key]) for r in part if isinstance(r.get(key), (int, float))]
        return sum(vals) / len(vals) if vals else math.nan

    first, last = rows[:window], rows[-window:]
    return {k: mean(first, k) for k in keys}, {k: mean(last, k) for k in keys}
