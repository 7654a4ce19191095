"""benchmarks/vision_learning.py: the questions say what the image shows, and the positive control is learned."""

import random

import pytest

from benchmarks.vision_learning import TASKS, color1, halves, main, presence, scenes
from engine.data.render import COLORS


@pytest.fixture(scope="module")
def scene_records(tmp_path_factory):
    root = tmp_path_factory.mktemp("vl")
    return {name: scenes(root, name, cfg, 12, 7, 1) for name, (_, cfg) in TASKS.items() if name != "halves"}


def test_questions_are_answered_by_the_image(scene_records):
    rng = random.Random(0)
    for record in scene_records["presence"]:
        colours = {o["color"] for o in record.meta["scene"]["objects"]}
        for _ in range(4):
            question, answer, _ = presence(record, rng)
            colour = next(c for c in COLORS if f" {c} " in question)
            assert answer == ("yes" if colour in colours else "no")
    for record in scene_records["color1"]:
        (obj,) = record.meta["scene"]["objects"]
        assert color1(record, rng)[1] == obj["color"] in COLORS
    record = scene_records["presence"][0]
    for _ in range(4):
        _, answer, rgb = halves(record, rng)
        left, right = rgb[:, : rgb.shape[1] // 2].float().mean(), rgb[:, rgb.shape[1] // 2 :].float().mean()
        assert (left < right) == (answer == "left")


@pytest.mark.slow
def test_the_image_path_learns_the_positive_control(tmp_path, capsys):
    """Random tiny model, answer-only SFT: which half is darker is learned from the pixels within 100 steps."""
    (result,) = main(["--tasks", "halves", "--steps", "100", "--eval-every", "100", "--batch-size", "8",
                      "--scenes", "128", "--data-dir", str(tmp_path), "--device", "cpu"])  # fmt: skip
    assert result["curve"][0]["accuracy"] < 0.75
    assert result["curve"][-1]["accuracy"] >= 0.9 > result["majority"]
    assert "| halves |" in capsys.readouterr().out
