"""benchmarks/crop_vs_text.py: two GRPO runs' held-out rows side by side, the crop-minus-text gain per type."""

import json

import pytest

from benchmarks.crop_vs_text import main


def _row(i, qtype, target, pred):
    return {"id": f"r{i}", "qtype": qtype, "answer_type": "word", "target": target, "options": 0, "answer": pred,
            "pred": pred, "correct": float(target == pred), "score": float(target == pred), "format": 1.0,
            "iou": 0.0, "depth": 0.0, "completion": ""}  # fmt: skip


def _write_run(folder, trained_preds):
    truths = [("attribute", "red"), ("attribute", "blue"), ("left_right", "left"), ("left_right", "right")]
    start = [_row(i, q, t, "red") for i, (q, t) in enumerate(truths)]
    trained = [_row(i, q, t, p) for i, ((q, t), p) in enumerate(zip(truths, trained_preds))]
    folder.mkdir(parents=True)
    payload = {"SFT export": {"records": start}, "after GRPO": {"records": trained}}
    (folder / "eval.json").write_text(json.dumps(payload))


def test_gain_per_type_and_the_comparison_files(tmp_path, capsys):
    _write_run(tmp_path / "text", ["red", "red", "left", "left"])  # attribute 1/2, left_right 1/2
    _write_run(tmp_path / "crop", ["red", "blue", "left", "left"])  # attribute 2/2, left_right 1/2
    gain = main([str(tmp_path / "text"), str(tmp_path / "crop"), "--out", str(tmp_path / "cmp")])
    assert gain == pytest.approx({"attribute": 0.5, "left_right": 0.0, "all": 0.25})
    written = json.loads((tmp_path / "cmp" / "eval.json").read_text())
    assert list(written) == ["text, SFT export", "text, after GRPO", "crop, SFT export", "crop, after GRPO"]
    assert (tmp_path / "cmp" / "eval.png").stat().st_size > 0
    assert "attribute" in capsys.readouterr().out


def test_runs_on_other_records_or_without_eval_are_refused(tmp_path):
    _write_run(tmp_path / "text", ["red"] * 4)
    with pytest.raises(SystemExit, match="no eval.json"):
        main([str(tmp_path / "text"), str(tmp_path / "none"), "--out", str(tmp_path / "cmp")])
    _write_run(tmp_path / "crop", ["red"] * 4)
    payload = json.loads((tmp_path / "crop" / "eval.json").read_text())
    payload["after GRPO"]["records"][0]["id"] = "other"
    (tmp_path / "crop" / "eval.json").write_text(json.dumps(payload))
    with pytest.raises(SystemExit, match="different held-out records"):
        main([str(tmp_path / "text"), str(tmp_path / "crop"), "--out", str(tmp_path / "cmp")])
