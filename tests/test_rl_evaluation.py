"""Held-out evaluation summaries: baselines, answer distribution and collapse detection, computed by hand."""

import pytest
import torch
from _toys import micro_config, toy_record

from engine.models import ImageConfig, Processor, Tokenizer, VLModel
from engine.models.tiny import init_weights
from engine.models.tokenizer import build_byte_tokenizer
from engine.rl.evaluation import collapsed_types, format_comparison, format_summary, image_reliance, summarise


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


def test_image_gap_by_hand_and_the_blind_warning() -> None:
    rows = _rows()
    for k, r in enumerate(rows):
        r["ce_own_image"], r["ce_other_image"] = 1.0, 1.0 + (0.2 if k == 0 else 0.0)
    rows[-1]["ce_own_image"] = rows[-1]["ce_other_image"] = None  # no trace: left out of the means
    summary = summarise(rows)
    assert summary["image_gap"] == pytest.approx(0.2 / (len(rows) - 1))
    assert summary["ce_own_image"] == pytest.approx(1.0)
    first_type = rows[0]["qtype"]
    n_first = sum(r["qtype"] == first_type and r["ce_own_image"] is not None for r in rows)
    assert summary["by_qtype"][first_type]["image_gap"] == pytest.approx(0.2 / n_first)
    text = format_summary(summary, "t")
    assert "image reliance" in text and ("does not use the image" in text) == (summary["image_gap"] < 0.01)
    for r in rows:
        if r["ce_own_image"] is not None:
            r["ce_other_image"] = r["ce_own_image"] + 0.5
    assert "does not use the image" not in format_summary(summarise(rows), "t")
    assert "image gap" in format_comparison({"a": summarise(rows), "b": summary})


def test_image_reliance_is_zero_for_a_model_that_ignores_the_image(tmp_path) -> None:
    """Teacher-forced CE under the own and another record's image: equal when the vision tower's output is
    constant, different for a model whose text depends on the pixels; None without a trace or a partner."""
    tok = Tokenizer(build_byte_tokenizer())
    model = VLModel(micro_config(tok)).eval()
    init_weights(model, seed=0)
    processor = Processor(tok, ImageConfig(min_pixels=56 * 56, max_pixels=56 * 56))
    records = [toy_record(tmp_path, 0), toy_record(tmp_path, 1), toy_record(tmp_path, 2, with_trace=False)]
    with torch.no_grad():
        seeing = image_reliance(model, processor, records, with_depth=False)
        assert seeing[2] is None and seeing[0][0] != pytest.approx(seeing[0][1], abs=1e-6)
        real_visual = model.visual.forward
        model.visual.forward = lambda *a, **k: torch.zeros_like(real_visual(*a, **k))
        blind = image_reliance(model, processor, records, with_depth=False)
    assert blind[0][0] == blind[0][1] and blind[1][0] == blind[1][1]
    assert image_reliance(model, processor, records[:1], with_depth=False) == [None]  # no other picture


def test_reference_token_accuracy_is_pooled_over_tokens_and_printed() -> None:
    rows = _rows()
    for k, r in enumerate(rows):
        r["ce_own_image"] = r["ce_other_image"] = 1.0
        r["reference_hits"] = {"names": [k % 2, 1], "seen": [0, 0], "boxes": [3, 4], "opener": [1, 1], "answer": [0, 2]}
    rows[0]["reference_hits"] = None  # a record without a partner image: left out
    summary = summarise(rows)
    scored = rows[1:]
    assert summary["reference_tokens"] == {
        "names": pytest.approx(sum(k % 2 for k in range(1, len(rows))) / len(scored)),
        "seen": None,
        "boxes": 0.75,
        "opener": 1.0,
        "answer": 0.0,
    }
    assert "teacher-forced token accuracy by part: names" in format_summary(summary, "t")
    assert "seen -  boxes 0.75" in format_summary(summary, "t")
