"""Record schema validation (bad records named, skipped, counted) and the SIF-50K reader."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from engine.data.depth_colormap import depth_to_spectral_r
from engine.data.schema import load_records, write_records
from engine.data.sif_format import DepthBox, format_response


@pytest.fixture
def files(tmp_path):
    Image.fromarray(np.zeros((40, 60, 3), np.uint8)).save(tmp_path / "img.png")
    Image.fromarray(np.zeros((40, 60), np.uint16)).save(tmp_path / "d.png")
    np.save(tmp_path / "d.npy", np.zeros((40, 60), np.float32))
    (tmp_path / "broken.png").write_bytes(b"not an image")
    return tmp_path


def _good(**over):
    rec = {
        "id": "r0",
        "image": "img.png",
        "depth": "d.png",
        "question": "Which is nearer?",
        "answer": "B",
        "answer_type": "choice",
        "gt_boxes": [[0.1, 0.1, 0.5, 0.5]],
        "qtype": "nearer_farther",
        "trace": [
            {"boxes": [{"bbox_2d": [0, 0, 1, 1], "depth": 0.5}], "text": "whole"},
            {"box": [0.1, 0.1, 0.5, 0.5], "depth": 0.25, "text": "target"},
        ],
    }
    rec.update(over)
    return {k: v for k, v in rec.items() if v is not None}


BAD = [
    ({"id": None}, "missing field: 'id'"),
    ({"question": None}, "missing field: 'question'"),
    ({"gt_boxes": [[0.1, 0.1, 1.5, 0.5]]}, "box outside image: gt_boxes[0] [0.1, 0.1, 1.5, 0.5] lies outside"),
    ({"gt_boxes": [[0.5, 0.1, 0.4, 0.5]]}, "bad box: gt_boxes[0]"),
    ({"image": "missing.png"}, "unreadable file: image"),
    ({"image": "broken.png"}, "unreadable file: image"),
    ({"depth": "nowhere.npy"}, "unreadable file: depth"),
    ({"answer_type": "colour"}, "bad value: answer_type 'colour'"),
    ({"answer": "maybe"}, "bad value: answer 'maybe' is not a valid choice answer"),
    ({"width": 61, "height": 40}, "bad value: width/height 61x40 but image"),
    ({"trace": [{"box": [0, 0, 1, 1], "depth": 2.0, "text": "x"}]}, "bad trace: trace[0].boxes[0].depth"),
    ({"trace": [{"box": [0, 0, 1, 1], "depth": 0.5, "text": " "}]}, "bad trace: trace[0].text"),
]


def test_bad_records_are_named_skipped_and_counted(files):
    lines = [json.dumps(_good())]
    lines += [json.dumps(_good(**{"id": f"bad{i}", **over})) for i, (over, _) in enumerate(BAD)]
    lines.append("{not json")
    lines.append(json.dumps(_good(id="npy", depth="d.npy")))
    lines.append(json.dumps(_good()))  # duplicate id r0
    path = files / "records.jsonl"
    path.write_text("\n".join(lines) + "\n\n")
    records, report = load_records(path)
    assert [r.id for r in records] == ["r0", "npy"]
    assert report.total == len(lines) and report.loaded == 2 and report.num_skipped == len(lines) - 2
    for lineno, (_, expected) in enumerate(BAD, start=2):
        where, reason = report.skipped[lineno - 2]
        assert where == f"{path}:{lineno}"
        assert expected in reason, reason
    assert report.skipped[-2][0] == f"{path}:{len(lines) - 2}" and "invalid JSON" in report.skipped[-2][1]
    assert "duplicate id: 'r0' already on line 1" in report.skipped[-1][1]
    assert report.by_reason["unreadable file"] == 3 and report.by_reason["missing field"] == 2
    assert f"loaded 2 of {len(lines)} records, skipped {len(lines) - 2}" in report.summary()


def test_record_fields_and_write_round_trip(files):
    (files / "records.jsonl").write_text(json.dumps(_good()) + "\n")
    (rec,), _ = load_records(files / "records.jsonl")
    assert rec.image == files / "img.png" and rec.depth == files / "d.png" and rec.depth_image is None
    assert (rec.width, rec.height) == (60, 40)
    depth = rec.load_depth_map()
    assert depth.shape == (40, 60) and depth.dtype == torch.float32 and float(depth.abs().max()) == 0.0
    assert rec.trace[1].boxes == (DepthBox(0.1, 0.1, 0.5, 0.5, 0.25),)
    assert rec.response() == format_response(
        [[DepthBox(0, 0, 1, 1, 0.5)], [DepthBox(0.1, 0.1, 0.5, 0.5, 0.25)]], ["whole", "target"], "B"
    )
    write_records(files / "copy.jsonl", [rec])
    assert json.loads((files / "copy.jsonl").read_text())["image"] == "img.png"
    (again,), report = load_records(files / "copy.jsonl")
    assert again == rec and report.num_skipped == 0


def test_sif50k_reader(files):
    Image.fromarray(depth_to_spectral_r(np.random.default_rng(0).random((40, 60)))).save(files / "img_d.png")
    trace = format_response([[DepthBox(0, 0, 1, 1, 0.5)], [DepthBox(0.1, 0.2, 0.3, 0.4, 0.3)]], ["all", "dog"], "red")
    base = {
        "dataset": "gqa",
        "image": "img.png",
        "depth_image": "img_d.png",
        "problem": "What colour is the dog?",
        "normalized_solution_round": {"bbox_3d": [[0.1, 0.2, 0.3, 0.4]], "illegal_content": False},
        "response": "red",
        "messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": trace}],
        "images": ["img.png", "img_d.png"],
    }
    pixel = dict(
        base,
        normalized_solution_round={"bbox_3d": [[6, 8, 30, 20]], "illegal_content": False},
        response="3",
        messages=[{"role": "assistant", "content": "<think>oops"}],
    )
    flagged = dict(base, normalized_solution_round={"bbox_3d": [[0.1, 0.2, 0.3, 0.4]], "illegal_content": True})
    missing = {k: v for k, v in base.items() if k != "problem"}
    (files / "sif.json").write_text(json.dumps([base, pixel, flagged, missing]))
    records, report = load_records(files / "sif.json")
    assert len(records) == 2 and report.num_skipped == 2
    a, b = records
    assert a.question == "What colour is the dog?" and a.answer == "red" and a.answer_type == "word"
    assert a.qtype == "gqa" and a.depth_image == files / "img_d.png"
    assert a.gt_boxes == ((0.1, 0.2, 0.3, 0.4),) and [s.text for s in a.trace] == ["all", "dog"]
    assert b.answer_type == "number" and b.trace is None
    assert b.gt_boxes == ((0.1, 0.2, 0.5, 0.5),)
    assert report.skipped[0][0].endswith("sif.json[2]") and "flagged" in report.skipped[0][1]
    assert report.skipped[1][0].endswith("sif.json[3]") and "missing field: 'problem'" in report.skipped[1][1]
    assert sum(report.notes.values()) == 1
