"""Held-out evaluation summaries: baselines, answer distribution and collapse detection, computed by hand."""

import pytest

from engine.rl.evaluation import collapsed_types, format_comparison, format_summary, summarise


def _row(qtype, answer_type, target, pred, correct, options=0, iou=0.0):
    return {
        "id": f"{qtype}-{target}-{pred}-{correct}-{iou}",
        "qtype": qtype,
        "answer_type": answer_type,
        "target": target,
        "options": options,
        "answer": None if pred == "<none>" else pred,
        "pred": pred,
        "correct": float(correct),
        "score": float(correct),
        "format": 1.0,
        "iou": iou,
        "depth": 0.0,
        "completion": "",
    }


def _rows():
    # left_right: truths left, left, left, right -> majority 0.75, chance 1/2; the policy always says "left"
    lr = [_row("left_right", "word", t, "left", t == "left") for t in ("left", "left", "left", "right")]
    # grounding: 2, 2, 4 options -> chance (1/2 + 1/2 + 1/4) / 3; truths A, B, A -> majority 2/3
    gr = [
        _row("grounding", "choice", "A", "A", True, options=2, iou=0.5),
        _row("grounding", "choice", "B", "A", False, options=2, iou=0.1),
        _row("grounding", "choice", "A", "C", False, options=4, iou=0.3),
    ]
    # locate: boxes never repeat -> no majority baseline; one missing answer
    lo = [
        _row("locate", "box", "[0.1, 0.1, 0.2, 0.2]", "[0.1,0.1,0.2,0.2]", True, iou=0.9),
        _row("locate", "box", "[0.5, 0.5, 0.6, 0.6]", "<none>", False),
    ]
    return lr + gr + lo


def test_summary_baselines_by_hand() -> None:
    s = summarise(_rows())
    lr, gr, lo = (s["by_qtype"][q] for q in ("left_right", "grounding", "locate"))
    assert (lr["n"], lr["accuracy"], lr["chance"], lr["majority"]) == (4, 0.75, 0.5, 0.75)
    assert (lr["top_pred"], lr["top_pred_share"], lr["top_true_share"]) == ("left", 1.0, 0.75)
    assert gr["chance"] == pytest.approx((0.5 + 0.5 + 0.25) / 3)
    assert gr["majority"] == pytest.approx(2 / 3) and gr["majority_answer"] == "A"
    assert gr["iou"] == pytest.approx(0.3)
    assert (lo["chance"], lo["majority"], lo["accuracy"], lo["distinct_preds"]) == (0.0, 0.0, 0.5, 2)
    assert s["num_records"] == 9 and s["accuracy"] == pytest.approx(5 / 9)
    assert s["majority"] == pytest.approx((4 * 0.75 + 3 * 2 / 3 + 0) / 9)
    assert s["answered"] == pytest.approx(8 / 9)


def test_collapse_is_flagged_only_past_the_margin() -> None:
    s = summarise(_rows())
    # left_right: 1.00 predicted vs 0.75 true (> 0.20 more); grounding: A is 2/3 of predictions and of truths
    assert set(collapsed_types(s)) == {"left_right"}
    assert collapsed_types(s, margin=0.3) == {}
    text = format_summary(s, "toy")
    assert "WARNING: left_right collapsed" in text and "grounding collapsed" not in text


def test_comparison_lists_every_model_and_type() -> None:
    a, b = summarise(_rows()), summarise(_rows()[:4] + _rows()[4:])
    text = format_comparison({"SFT": a, "GRPO": b})
    assert "SFT" in text and "GRPO" in text
    for q in ("left_right", "grounding", "locate", "all", "format"):
        assert any(line.strip().startswith(q) for line in text.splitlines())
