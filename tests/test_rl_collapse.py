"""Collapse signals: zero-spread groups, distinct answers per group, and the answer-collapse warning."""

import pytest
import torch

from engine.rl.collapse import AnswerWatch, group_signals


def test_group_signals_by_hand() -> None:
    # two groups of 3: rewards (1, 1, 1) have zero spread, (0, 1, 0.5) do not
    total = torch.tensor([1.0, 1.0, 1.0, 0.0, 1.0, 0.5])
    answers = ["left", "Left.", "left", "B", None, "(B)"]
    types = ["word", "word", "word", "choice", "choice", "choice"]
    out = group_signals(total, answers, types, num_generations=3)
    assert out["collapse/zero_spread_groups"] == 0.5
    assert out["collapse/distinct_answers"] == 1.5  # {left} and {B, <none>}


def test_group_signals_rejects_ragged_groups() -> None:
    with pytest.raises(ValueError, match="G = 4"):
        group_signals(torch.zeros(6), ["a"] * 6, ["word"] * 6, num_generations=4)


def test_answer_watch_warns_once_on_a_constant_answer_and_recovers(capsys) -> None:
    watch = AnswerWatch(window=40, margin=0.2, min_samples=20)
    truths = ["left", "right"] * 10  # true top share 0.5
    out = watch.update(["left_right"] * 20, ["left"] * 20, truths, ["word"] * 20)
    assert "left_right: 'left' is 100% of the last 20 predictions" in capsys.readouterr().err
    assert out["collapse/answer_excess"] == pytest.approx(0.5)
    watch.update(["left_right"] * 2, ["left"] * 2, ["left", "right"], ["word"] * 2)
    assert capsys.readouterr().err == ""  # still collapsed: no second warning
    recovered = watch.update(["left_right"] * 40, truths * 2, truths * 2, ["word"] * 40)
    assert recovered["collapse/answer_excess"] == 0.0 and watch.flagged == set()
    state = watch.state_dict()
    again = AnswerWatch(window=40, margin=0.2, min_samples=20)
    again.load_state_dict(state)
    assert list(again.samples) == list(watch.samples)


def test_answer_watch_is_quiet_when_not_verbose(capsys) -> None:
    watch = AnswerWatch(window=40, min_samples=4, verbose=False)
    out = watch.update(["counting"] * 8, ["1"] * 8, ["2", "3"] * 4, ["number"] * 8)
    assert out["collapse/answer_excess"] == pytest.approx(0.5) and capsys.readouterr().err == ""


def test_answer_watch_waits_for_enough_samples() -> None:
    watch = AnswerWatch(min_samples=32)
    assert watch.update(["counting"] * 8, ["1"] * 8, ["2"] * 8, ["number"] * 8) == {"collapse/answer_excess": 0.0}
