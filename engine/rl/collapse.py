"""Collapse signals of a GRPO run, logged every step.

A rising reward can hide a policy that has stopped learning: groups whose G rewards are all equal give no
gradient (zero advantage), and a policy that answers one constant per question type wins every prompt whose true
answer happens to be that constant. Per step this module reports

* ``collapse/zero_spread_groups``: the fraction of groups whose rewards have zero spread (no learning signal);
* ``collapse/distinct_answers``: the mean number of distinct (normalised) answers per group;
* ``collapse/answer_excess``: over a sliding window of recent samples, the largest amount by which the most
  frequent predicted answer of a question type covers more of that type's predictions than its most frequent
  true answer covers of the truths (0.8 predicted "1" against 0.45 true "1" is 0.35).

:class:`AnswerWatch` prints a warning (once per type until it recovers) when the excess of a type passes
``margin``.
"""

from __future__ import annotations

import sys
from collections import Counter, deque
from collections.abc import Sequence

import torch

from engine.data.answers import normalize_answer
from engine.rl.evaluation import NO_ANSWER


def _answer_key(answer: str | None, answer_type: str) -> str:
    if answer is None or not answer.strip():
        return NO_ANSWER
    return normalize_answer(answer, answer_type) or NO_ANSWER


def group_signals(
    total: torch.Tensor, answers: Sequence[str | None], answer_types: Sequence[str], num_generations: int
) -> dict[str, float]:
    """Zero-spread group fraction and distinct answers per group of one step's samples.

    total: float [B] total rewards, B = groups × ``num_generations``, grouped contiguously; ``answers`` and
    ``answer_types`` per sample in the same order.
    """
    if total.numel() % num_generations or len(answers) != total.numel():
        raise ValueError(f"group_signals: {total.numel()} rewards, {len(answers)} answers, G = {num_generations}")
    groups = total.view(-1, num_generations)
    spread = groups.max(dim=1).values - groups.min(dim=1).values
    keys = [_answer_key(a, t) for a, t in zip(answers, answer_types)]
    distinct = [len(set(keys[k : k + num_generations])) for k in range(0, len(keys), num_generations)]
    return {
        "collapse/zero_spread_groups": float((spread <= 1e-9).float().mean()),
        "collapse/distinct_answers": sum(distinct) / max(len(distinct), 1),
    }


class AnswerWatch:
    """Sliding window of (question type, predicted answer, true answer) over the last ``window`` samples.

    ``update`` returns ``collapse/answer_excess`` and, with ``verbose``, prints a warning for a type with at least
    ``min_samples`` samples in the window whose predicted top share exceeds its true top share by more than
    ``margin`` (every rank keeps the same window; one of them prints).
    """

    def __init__(self, window: int = 256, margin: float = 0.2, min_samples: int = 32, verbose: bool = True) -> None:
        self.samples: deque[tuple[str, str, str]] = deque(maxlen=window)
        self.margin, self.min_samples, self.verbose = margin, min_samples, verbose
        self.flagged: set[str] = set()

    def update(
        self, qtypes: Sequence[str], answers: Sequence[str | None], targets: Sequence[str], answer_types: Sequence[str]
    ) -> dict[str, float]:
        for q, a, t, at in zip(qtypes, answers, targets, answer_types):
            self.samples.append((q, _answer_key(a, at), normalize_answer(t, at)))
        worst = 0.0
        for qtype in sorted({q for q, _, _ in self.samples}):
            part = [(p, t) for q, p, t in self.samples if q == qtype]
            if len(part) < self.min_samples:
                continue
            pred, pred_n = Counter(p for p, _ in part).most_common(1)[0]
            true_n = Counter(t for _, t in part).most_common(1)[0][1]
            excess = (pred_n - true_n) / len(part)
            worst = max(worst, excess)
            if excess > self.margin and qtype not in self.flagged:
                self.flagged.add(qtype)
                if self.verbose:
                    print(
                        f"[grpo] WARNING answer collapse: {qtype}: {pred!r} is {pred_n / len(part):.0%} of the last "
                        f"{len(part)} predictions, the most common true answer {true_n / len(part):.0%}",
                        file=sys.stderr,
                        flush=True,
                    )
            elif excess <= self.margin:
                self.flagged.discard(qtype)
        return {"collapse/answer_excess": worst}

    def state_dict(self) -> dict:
        return {"samples": list(self.samples), "flagged": sorted(self.flagged)}

    def load_state_dict(self, state: dict) -> None:
        self.samples.clear()
        self.samples.extend(tuple(s) for s in state["samples"])
        self.flagged = set(state["flagged"])
