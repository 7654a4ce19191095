"""benchmarks/vision_learning.py: the questions say what the image shows, and the positive control is learned."""

import argparse
import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import benchmarks.vision_learning as vision_learning
from benchmarks.vision_learning import (
    TASKS,
    box_answers,
    color1,
    colour_presence_probe,
    echo,
    format_table,
    halves,
    main,
    parameter_groups,
    presence,
    prior_box,
    scene_tag,
    scenes,
    side,
    synth_config,
    tiny_start,
    training_example,
)
from engine.data.render import COLORS
from engine.models import from_pretrained, processor_from_pretrained
from engine.models.tiny import create_tiny_checkpoint

REPO = Path(__file__).resolve().parents[1]


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


def test_side_names_one_object_and_answers_by_its_box_centre(scene_records):
    rng = random.Random(0)
    answers = []
    for record in scene_records["side"]:
        objects = record.meta["scene"]["objects"]
        for _ in range(4):
            question, answer, _ = side(record, rng)
            named = [o for o in objects if f"the {o['color']} {o['shape']} in" in question]
            assert len(named) == 1, question
            assert answer == ("left" if (named[0]["box"][0] + named[0]["box"][2]) / 2 < 0.5 else "right")
            answers.append(answer)
    assert set(answers) == {"left", "right"}


def test_rope_theta_changes_only_the_decoder_rotary_base(tmp_path):
    default = from_pretrained(tiny_start(tmp_path, 0)).config
    changed = from_pretrained(tiny_start(tmp_path, 2.5)).config
    assert changed.text.rope_theta == 2.5 != default.text.rope_theta
    changed.text.rope_theta = default.text.rope_theta
    assert changed == default


@pytest.mark.slow
def test_the_image_path_learns_the_positive_control(tmp_path):
    """Random tiny model, answer-only SFT: which half is darker is learned from the pixels within 100 steps.

    It runs in a fresh interpreter: learning from random weights is a threshold effect, and a process that other
    tests have used (thread pools, allocator and library state) once stayed at the majority answer here."""
    out = tmp_path / "curve.json"
    cmd = [sys.executable, "-m", "benchmarks.vision_learning", "--tasks", "halves", "--steps", "100",
           "--eval-every", "50", "--batch-size", "8", "--scenes", "128", "--data-dir", str(tmp_path),
           "--device", "cpu", "--json", str(out)]  # fmt: skip
    run = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    (result,) = json.loads(out.read_text())
    assert result["curve"][0]["accuracy"] < 0.75
    assert result["curve"][-1]["accuracy"] >= 0.9 > result["majority"], run.stdout
    assert "| halves |" in run.stdout


def test_ask_scores_each_question_kind_beside_its_majority(tmp_path):
    """The ``ask`` task (the generator's own questions answered directly) reports every kind it asked, with that
    kind's majority and chance on the held-out scenes, and a curriculum stage saved by ``--save`` loads again."""
    results = main(["--tasks", "ask", "--qtypes", "left_right,counting", "--steps", "2", "--eval-every", "2",
                    "--batch-size", "2", "--scenes", "6", "--held-out", "12", "--framing", "close",
                    "--data-dir", str(tmp_path), "--device", "cpu", "--save", str(tmp_path / "stage")])  # fmt: skip
    (result,) = results
    assert set(result["kinds"]) == {"left_right", "counting"}
    assert sum(k["n"] for k in result["kinds"].values()) == 12
    for kind in result["kinds"].values():
        assert 0 < kind["chance"] <= kind["majority"] <= 1
    assert set(result["curve"][-1]["kinds"]) == {"left_right", "counting"}
    assert "| ask/counting (n=" in format_table(results)
    again = main(["--tasks", "ask", "--qtypes", "left_right,counting", "--steps", "0", "--eval-every", "1",
                  "--scenes", "6", "--held-out", "12", "--framing", "close", "--data-dir", str(tmp_path),
                  "--device", "cpu", "--init", str(tmp_path / "stage")])  # fmt: skip
    assert again[0]["curve"][0]["accuracy"] == result["curve"][-1]["accuracy"]


def test_a_box_answer_is_generated_from_its_prompt_and_scored_by_iou(monkeypatch):
    """The prompt is the example up to its first scored token; the generated box's IoU with the true one is the
    score, 0 when the answer names no valid box; the prior box is the mean of the training answers."""
    seen = []

    def fake_generate(model, processor, prompts, num_samples, max_new_tokens, temperature, decode):
        seen.extend(prompts)
        assert (num_samples, temperature, decode) == (1, 0.0, "eager")
        texts = ["[0.1, 0.2, 0.5, 0.6]", "[0.3, 0.2, 0.5, 0.6]", "left"]
        return [argparse.Namespace(text=t) for t in texts[: len(prompts)]]

    monkeypatch.setattr(vision_learning, "generate", fake_generate)
    ids = torch.arange(10)
    mask = torch.zeros(10, dtype=torch.bool)
    mask[6:] = True
    example = vision_learning.SFTExample("r", ids, mask, None, None)
    truths = ["[0.1, 0.2, 0.5, 0.6]"] * 3
    out = box_answers(None, None, [example] * 3, truths, torch.device("cpu"))
    assert [round(iou, 4) for iou, _ in out] == [1.0, 0.5, 0.0]
    assert [t for _, t in out][2] == "left"
    assert all(p["input_ids"].tolist() == list(range(6)) for p in seen)
    assert prior_box(["[0.0, 0.0, 0.5, 0.5]", "[0.5, 0.5, 1.0, 1.0]"]) == (0.25, 0.25, 0.75, 0.75)


def test_ask_scores_a_box_kind_by_the_iou_of_its_generated_answer(tmp_path):
    """``--qtypes locate``: the box kind is scored by generation, beside the prior box's IoU and hit rate."""
    (result,) = main(["--tasks", "ask", "--qtypes", "left_right,locate", "--steps", "1", "--eval-every", "1",
                      "--batch-size", "2", "--scenes", "6", "--held-out", "10", "--framing", "close",
                      "--data-dir", str(tmp_path), "--device", "cpu"])  # fmt: skip
    locate = result["kinds"]["locate"]
    assert 0.0 < locate["prior_iou"] < 1.0 and locate["majority"] == locate["chance"] and locate["blind_ce"] == 0.0
    assert "prior_iou" not in result["kinds"]["left_right"]
    for point in result["curve"]:
        assert 0.0 <= point["kinds"]["locate"]["iou"] <= 1.0
        assert "iou" not in point["kinds"]["left_right"]
    assert f"({locate['prior_iou']:.3f}) |" in format_table([result])
    with pytest.raises(SystemExit, match="unknown --qtypes"):
        main(["--tasks", "ask", "--qtypes", "where"])


def test_a_mixture_scores_each_part_on_its_own_scenes(tmp_path):
    """``a+b`` trains one model on both tasks and scores each on its own held-out scenes and baselines; the echo
    control's answer is the colour its question names."""
    rng = random.Random(0)
    (result,) = main(["--tasks", "echo+color1", "--steps", "2", "--eval-every", "2", "--batch-size", "2",
                      "--scenes", "4", "--held-out", "6", "--data-dir", str(tmp_path), "--device", "cpu"])  # fmt: skip
    assert set(result["kinds"]) == {"echo", "color1"}
    assert [k["n"] for k in result["kinds"].values()] == [6, 6]
    assert set(result["curve"][0]["kinds"]) == {"echo", "color1"}
    record = scenes(tmp_path, "any", TASKS["echo"][1], 1, 3, 1)[0]
    for _ in range(4):
        question, answer, _ = echo(record, rng)
        assert f" {answer} or none?" in question and answer in COLORS


@pytest.mark.slow
def test_the_colour_probe_reads_the_vision_features_and_only_them(tmp_path):
    """A linear probe finds which colours a close scene shows in the random tower's pooled features (well above the
    majority), and finds nothing when the tower's output is constant."""
    args = argparse.Namespace(framing="close", fov_deg=0.0, qtypes="")
    cfg = synth_config("presence", args)
    train, held = scenes(tmp_path, "train", cfg, 120, 7, 1), scenes(tmp_path, "held", cfg, 60, 8, 1)
    checkpoint = create_tiny_checkpoint(tmp_path / "tiny", seed=0)
    model, processor = from_pretrained(checkpoint), processor_from_pretrained(checkpoint)
    seeing = colour_presence_probe(model, processor, train, held, torch.device("cpu"))
    assert seeing["accuracy"] >= seeing["majority"] + 0.08, seeing
    model.visual.forward = lambda pixels, grid: torch.ones(int(grid.prod(-1).sum()) // 4, 192)
    blind = colour_presence_probe(model, processor, train, held, torch.device("cpu"))
    assert blind["accuracy"] <= blind["majority"] + 0.02, blind


def test_scenes_are_generated_again_when_more_are_asked(tmp_path):
    cfg = TASKS["presence"][1]
    few = scenes(tmp_path, "s", cfg, 2, 7, 1)
    more = scenes(tmp_path, "s", cfg, 4, 7, 1)
    assert len(few) == 2 and len(more) == 4
    assert [r.id for r in more[:2]] == [r.id for r in few]


def test_turns_ask_several_questions_about_one_scene_and_score_every_answer(tmp_path):
    (record,) = scenes(tmp_path, "p", TASKS["presence"][1], 1, 7, 1)
    processor = processor_from_pretrained(create_tiny_checkpoint(tmp_path / "tiny", seed=0))
    args = argparse.Namespace(turns=3, bare=False)
    ex = training_example(processor, record, presence, random.Random(0), args)
    scored = processor.tokenizer.decode(ex.input_ids[ex.assistant_mask].tolist())
    assert scored.count("<|im_end|>") == 3
    colours = {o["color"] for o in record.meta["scene"]["objects"]}
    text = processor.tokenizer.decode(ex.input_ids.tolist())
    for question, answer in zip(text.split("Is there a ")[1:], scored.split("<|im_end|>")):
        assert answer == ("yes" if question.split(" object")[0] in colours else "no")


@pytest.mark.parametrize("scale", [0.0, 0.1, 1.0])
def test_the_vision_tower_learns_at_its_own_rate_or_not_at_all(tmp_path, scale):
    model = from_pretrained(create_tiny_checkpoint(tmp_path / "tiny", seed=0))
    groups = parameter_groups(model, 0.1, scale)
    in_groups = {id(p): g["lr_scale"] for g in groups for p in g["params"]}
    assert all(in_groups[id(p)] == 1.0 for p in model.model.parameters())
    assert all(in_groups.get(id(p)) == (scale or None) for p in model.visual.parameters())
    assert all(p.requires_grad == (scale > 0) for p in model.visual.parameters())
    assert len(in_groups) == sum(1 for p in model.parameters() if p.requires_grad)
    assert {g["weight_decay"] for g in groups if all(p.ndim < 2 for p in g["params"])} == {0.0}


def test_a_part_at_another_framing_sees_its_own_scenes(tmp_path):
    """``side@close+side``: one model, the close part's scenes generated under the close framing (2-3 objects), the
    other's under the command line's default (3-6), each scored apart; an unknown framing is refused by name."""
    (result,) = main(["--tasks", "side@close+side", "--steps", "1", "--eval-every", "1", "--batch-size", "2",
                      "--scenes", "3", "--held-out", "4", "--data-dir", str(tmp_path), "--device", "cpu"])  # fmt: skip
    assert set(result["kinds"]) == {"side@close", "side"}
    close, default = (synth_config("side", argparse.Namespace(framing=f, fov_deg=0.0)) for f in ("close", "default"))
    assert (close.max_objects, default.max_objects) == (3, 6)
    folders = sorted(d.name for d in tmp_path.iterdir() if d.name.startswith("side-"))
    assert folders == sorted(f"{scene_tag('side', c)}-{s}" for c in (close, default) for s in ("held", "train"))
    with pytest.raises(SystemExit, match=r"\['@far'\].*each optionally @ one of \['close', 'default'\]"):
        main(["--tasks", "side@far", "--data-dir", str(tmp_path)])


def test_the_oracle_tower_gives_each_image_token_its_alignment_target(tmp_path):
    """``--oracle-tower``: the model's image tokens are the embeddings of the words naming what each token shows,
    looked up by the pixels, so the decoder sees exactly the alignment targets; it cannot be probed or saved."""
    from benchmarks.vision_learning import OracleTower, example
    from engine.train.vision_align import AlignmentTargets

    records = scenes(tmp_path, "p", synth_config("presence", argparse.Namespace(framing="close", fov_deg=0.0)), 2, 7, 1)
    checkpoint = create_tiny_checkpoint(tmp_path / "tiny", seed=0)
    model, processor = from_pretrained(checkpoint), processor_from_pretrained(checkpoint)
    oracle = OracleTower(model, processor)
    rng = random.Random(0)
    examples = [oracle.register(r, example(processor, r, *presence(r, rng))) for r in records]
    tokens = oracle(torch.cat([e.pixel_values for e in examples]), torch.cat([e.image_grid_thw for e in examples]))
    expected = AlignmentTargets(records, model, processor)
    torch.testing.assert_close(tokens, torch.cat([t for _, t in expected.items]))
    (result,) = main(["--tasks", "presence", "--oracle-tower", "--steps", "1", "--eval-every", "1", "--batch-size",
                      "2", "--scenes", "2", "--held-out", "2", "--framing", "close", "--data-dir", str(tmp_path),
                      "--device", "cpu"])  # fmt: skip
    assert len(result["curve"]) == 2
    with pytest.raises(SystemExit, match="--oracle-tower has no vision tower"):
        main(["--tasks", "presence", "--oracle-tower", "--probe", "4", "--data-dir", str(tmp_path)])


def test_the_learning_rate_warms_up_then_stays_or_decays():
    """``--schedule constant`` keeps the old flat rate after the warm-up; ``cosine`` ends at ``--min-lr-ratio``."""
    from benchmarks.vision_learning import lr_multiplier

    flat = argparse.Namespace(steps=100, warmup=10, schedule="constant", min_lr_ratio=0.05)
    decayed = argparse.Namespace(**{**vars(flat), "schedule": "cosine"})
    assert [lr_multiplier(s, flat) for s in (0, 4, 9)] == [0.1, 0.5, 1.0]
    assert [lr_multiplier(s, decayed) for s in (0, 4, 9)] == [0.1, 0.5, 1.0]
    assert all(lr_multiplier(s, flat) == 1.0 for s in range(10, 100))
    rates = [lr_multiplier(s, decayed) for s in range(10, 101)]
    assert rates[0] == 1.0 and all(a >= b for a, b in zip(rates, rates[1:]))
    assert rates[-1] == pytest.approx(0.05)
