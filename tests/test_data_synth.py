"""Synthetic scenes: renderer geometry, bundled-set determinism, answers recomputed independently, traces."""

import json
import math
import re

import numpy as np
import pytest

from engine.data import bundled_dataset_dir
from engine.data.images import load_depth, load_image
from engine.data.render import Camera, SceneObject, render
from engine.data.schema import load_records
from engine.data.sif_format import parse_response
from engine.data.synth import BUNDLED_CONFIG, BUNDLED_SPECS, generate_dataset, main

CAM = Camera.make(96, 96, 60.0, 2.0, 0.0)  # level camera: the optical axis clears the floor
LIGHT = np.array([0.0, 1.0, 0.0])


def _on_axis(dist: float) -> np.ndarray:
    return np.asarray(CAM.position) + dist * np.asarray(CAM.forward)


def _sphere(dist: float, r: float = 0.5, color: str = "red") -> SceneObject:
    return SceneObject("sphere", color, tuple(_on_axis(dist)), r, r)


def test_render_depth_perspective_and_occlusion():
    near = render([_sphere(4.0)], CAM, LIGHT, 16.0)
    c = CAM.width // 2
    assert near.ids[c, c] == 0
    assert near.z[c, c] == pytest.approx(4.0 - 0.5, abs=2e-3)  # front surface on the optical axis
    zmin = near.z.min()
    assert near.depth[c, c] == pytest.approx((near.z[c, c] - zmin) / (16.0 - zmin), abs=1e-5)
    assert near.depth.min() == 0.0 and near.depth.max() == 1.0
    far = render([_sphere(8.0)], CAM, LIGHT, 16.0)
    width_near = (near.ids[c] == 0).sum()
    width_far = (far.ids[c] == 0).sum()
    assert abs(width_near / width_far - 2.0) < 0.2  # apparent size ~ 1 / distance
    cube_behind = SceneObject("cube", "blue", tuple(_on_axis(8.0)), 0.8, 0.8, 0.3)
    both = render([_sphere(4.0), cube_behind], CAM, LIGHT, 16.0)
    assert both.ids[c, c] == 0 and both.unoccluded[1] > (both.ids == 1).sum() > 0
    cube_front = SceneObject("cube", "blue", tuple(_on_axis(3.0)), 0.3, 0.3, 0.3)
    assert render([_sphere(4.0), cube_front], CAM, LIGHT, 16.0).ids[c, c] == 1
    # shading: the lit top of the sphere is brighter than its side
    red = near.rgb[..., 0].astype(int)
    rows = np.nonzero(near.ids[:, c] == 0)[0]
    assert red[rows[0] + 1, c] > red[rows[len(rows) // 2], c] - 1


def _objects(scene):
    return {f"{o['color']} {o['shape']}": o for o in scene["objects"]}


def _view(scene, obj):
    cam = scene["camera"]
    rel = np.subtract(obj["center"], cam["position"])
    z = rel @ np.asarray(cam["forward"])
    u = cam["width"] / 2 + cam["f"] * (rel @ np.asarray(cam["right"])) / z
    v = cam["height"] / 2 + cam["f"] * (rel @ np.asarray(cam["down"])) / z
    return u, v, z


def _volume(obj):
    s, h = obj["size"], obj["half_height"]
    return {"sphere": 4 / 3 * math.pi * s**3, "cube": 8 * s**3, "cylinder": 2 * math.pi * s * s * h}[obj["shape"]]


def _option_objects(options, objs):
    return {k: objs[v.removeprefix("the ")] for k, v in options.items()}


def expected_answer(rec):
    """Recompute (answer, boxes of the named objects) from the question text and the scene description alone."""
    scene, q = rec.meta["scene"], rec.question
    objs = _objects(scene)
    if rec.qtype in ("left_right", "above_below"):
        pattern = {
            "left_right": r"Is the (\w+ \w+) to the left or to the right of the (\w+ \w+)\?",
            "above_below": r"In the image, is the (\w+ \w+) above or below the (\w+ \w+)\?",
        }[rec.qtype]
        a, b = (objs[n] for n in re.fullmatch(pattern, q).groups())
        ua, va, _ = _view(scene, a)
        ub, vb, _ = _view(scene, b)
        if rec.qtype == "left_right":
            return ("left" if ua < ub else "right"), [a["box"], b["box"]]
        return ("above" if va < vb else "below"), [a["box"], b["box"]]
    if rec.qtype in ("nearer_farther", "size_compare"):
        opts = _option_objects(rec.options, objs)
        key = (lambda o: _view(scene, o)[2]) if rec.qtype == "nearer_farther" else (lambda o: -_volume(o))
        letter = min(opts, key=lambda k: key(opts[k]))
        return letter, None
    if rec.qtype == "counting":
        m = re.fullmatch(r"How many (\w+)s are there in the image\?", q)
        if m:
            hits = [o for o in scene["objects"] if o["shape"] == m.group(1)]
        else:
            color = re.fullmatch(r"How many (\w+) objects are there\?", q).group(1)
            hits = [o for o in scene["objects"] if o["color"] == color]
        return str(len(hits)), [o["box"] for o in hits]
    if rec.qtype == "attribute":
        shape = re.fullmatch(r"What color is the (\w+) that is farthest from the camera\?", q).group(1)
        far = max((o for o in scene["objects"] if o["shape"] == shape), key=lambda o: _view(scene, o)[2])
        return far["color"], [far["box"]]
    name = re.search(r"(?:contains|bounding box of) the (\w+ \w+)", q).group(1)
    target = objs[name]
    if rec.qtype == "grounding":
        letter = [k for k, v in rec.options.items() if json.loads(v) == pytest.approx(target["box"], abs=1e-9)]
        assert len(letter) == 1
        return letter[0], [target["box"]]
    return json.dumps(target["box"]), [target["box"]]


@pytest.fixture(scope="module")
def bundled():
    out = {}
    for split in BUNDLED_SPECS:
        records, report = load_records(bundled_dataset_dir(split) / "records.jsonl")
        assert report.num_skipped == 0, report.summary()
        out[split] = records
    return out


def test_bundled_shape_and_size(bundled):
    assert {k: len(v) for k, v in bundled.items()} == {k: s["n"] for k, s in BUNDLED_SPECS.items()}
    train_scenes = {r.meta["scene"]["scene_id"] for r in bundled["train"]}
    held_scenes = {r.meta["scene"]["scene_id"] for r in bundled["heldout"]}
    assert not train_scenes & held_scenes
    root = bundled_dataset_dir("train").parent
    assert sum(f.stat().st_size for f in root.rglob("*") if f.is_file()) <= 8 * 2**20
    assert {r.qtype for r in bundled["train"]} == set(BUNDLED_CONFIG.qtypes)


def test_every_answer_recomputed_from_the_scene(bundled):
    for rec in bundled["train"] + bundled["heldout"]:
        answer, boxes = expected_answer(rec)
        if rec.answer_type == "box":
            assert json.loads(rec.answer) == pytest.approx(json.loads(answer)), rec.id
        else:
            assert rec.answer == answer, rec.id
        if boxes is not None:
            assert [list(b) for b in rec.gt_boxes] == boxes, rec.id
        cam = rec.meta["scene"]["camera"]
        for o in rec.meta["scene"]["objects"]:  # the (visible-part) box lies within the object's projected extent
            u, v, z = _view(rec.meta["scene"], o)
            extent = math.hypot(o["size"], o["half_height"])
            reach = cam["f"] * 1.5 * extent / (z - extent) + 1.0
            x1, y1, x2, y2 = (c * n for c, n in zip(o["box"], (rec.width, rec.height) * 2))
            assert u - reach <= x1 < x2 <= u + reach and v - reach <= y1 < y2 <= v + reach, rec.id


def _mean_depth(depth, box):
    h, w = depth.shape
    c0, r0 = math.floor(box[0] * w), math.floor(box[1] * h)
    c1, r1 = max(math.ceil(box[2] * w), c0 + 1), max(math.ceil(box[3] * h), r0 + 1)
    return float(depth[r0:r1, c0:c1].mean())


def _inside(outer, inner):
    return all(outer[k] <= inner[k] + 1e-9 for k in (0, 1)) and all(outer[k] >= inner[k] - 1e-9 for k in (2, 3))


def test_traces_nested_end_at_target_and_carry_box_depth(bundled):
    for rec in bundled["train"][:60] + bundled["heldout"][:20]:
        parsed = parse_response(rec.response())
        assert parsed.error is None and parsed.answer == rec.answer
        steps = rec.trace
        assert 3 <= len(steps) <= 5, rec.id
        assert [tuple(s.boxes[0][:4]) for s in steps[:1]] == [(0.0, 0.0, 1.0, 1.0)]
        assert [tuple(b[:4]) for b in steps[-1].boxes] == list(rec.gt_boxes)
        chain = [s for s in steps if s.kind != "distractor"]
        for outer, inner in zip(chain, chain[1:]):
            assert {b[:4] for b in outer.boxes} != {b[:4] for b in inner.boxes}, rec.id  # strictly narrower
            assert all(any(_inside(o, i) for o in outer.boxes) for i in inner.boxes), rec.id
        for k, s in enumerate(steps):
            if s.kind == "distractor":
                nxt = steps[k + 1].boxes
                ex = (min(b[0] for b in nxt), min(b[1] for b in nxt), max(b[2] for b in nxt), max(b[3] for b in nxt))
                d = s.boxes[0]
                iw = max(0.0, min(d[2], ex[2]) - max(d[0], ex[0]))
                ih = max(0.0, min(d[3], ex[3]) - max(d[1], ex[1]))
                assert iw * ih < 0.001 * ((d[2] - d[0]) * (d[3] - d[1])), rec.id
        depth = load_depth(rec.depth).numpy()
        for s in steps:
            for b in s.boxes:
                assert abs(b.depth - _mean_depth(depth, b)) <= 5e-4 + 2 / 65535, rec.id


def test_trace_texts_name_the_targets_and_conclude_with_the_answer(bundled):
    """First step: the objects to find (two-object choices in option order, so it does not give the answer away);
    last step: the conclusion holding the answer; the texts stay short (the tiny model pays a token per byte)."""
    for rec in bundled["train"] + bundled["heldout"]:
        first, last = rec.trace[0].text, rec.trace[-1].text
        assert first.startswith("Find the "), rec.id
        if rec.qtype in ("nearer_farther", "size_compare"):
            assert first == f"Find {rec.options['A']} and {rec.options['B']}.", rec.id
            assert last.startswith("A at depth ") and last.endswith(f": {rec.answer}."), rec.id
        else:
            assert rec.answer in last, rec.id
        assert len(rec.response()) <= 700, rec.id


def test_depth_files_agree(bundled):
    rec = bundled["heldout"][0]
    depth = load_depth(rec.depth)
    assert depth.shape == (rec.height, rec.width) and float(depth.min()) == 0.0
    assert (load_depth(rec.depth_image) - depth).abs().max() <= 1 / 255 + 2 / 65535
    assert load_image(rec.image).shape == (rec.height, rec.width, 3)


def _assert_same(a, b, where="record"):
    """Equal JSON trees; floats to 1e-12 relative (libm may differ in the last bit across platforms)."""
    if isinstance(a, float) or isinstance(b, float):
        assert a == pytest.approx(b, rel=1e-12, abs=1e-15), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, list):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def test_bundled_equals_fresh_generation(tmp_path):
    for split, spec in BUNDLED_SPECS.items():
        out = tmp_path / split
        fresh = generate_dataset(out, 4, spec["seed"], BUNDLED_CONFIG)
        root = bundled_dataset_dir(split)
        shipped = [json.loads(line) for line in (root / "records.jsonl").read_text().splitlines()[:4]]
        fresh = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
        _assert_same(fresh, shipped)
        for rec in fresh:
            for key in ("image", "depth_image"):
                assert np.array_equal(load_image(out / rec[key]).numpy(), load_image(root / rec[key]).numpy())
            assert np.array_equal(load_depth(out / rec["depth"]).numpy(), load_depth(root / rec["depth"]).numpy())


def test_cli_writes_a_loadable_dataset(tmp_path, capsys):
    assert main(["--out", str(tmp_path), "--n", "3", "--seed", "7", "--size", "64", "48", "--no-trace"]) == 0
    assert "wrote 3 records" in capsys.readouterr().out
    records, report = load_records(tmp_path / "records.jsonl")
    assert len(records) == 3 and report.num_skipped == 0
    assert all(r.trace is None and (r.width, r.height) == (64, 48) for r in records)
    assert len(list((tmp_path / "images").glob("*.png"))) == 3
    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path), "--n", "1", "--qtypes", "colour"])


@pytest.fixture(scope="module")
def scenes():
    from engine.data.synth import make_scene

    return [make_scene(4242, i) for i in range(150)]


def test_answers_are_balanced_by_construction(scenes):
    """Two-way answers are drawn before the pair, counts before the attribute (the old makers gave ``1`` to ~60 %
    of the counting questions)."""
    from collections import Counter

    from engine.data.synth_questions import make_question

    answers = {q: Counter() for q in ("left_right", "above_below", "counting")}
    for i, scene in enumerate(scenes):
        rng = np.random.default_rng([4242, i, 1])
        for qtype, counter in answers.items():
            q = make_question(qtype, scene, rng)
            if q is not None:
                counter[q.answer] += 1
    for qtype in ("left_right", "above_below"):
        total = sum(answers[qtype].values())
        assert total > 100 and max(answers[qtype].values()) / total < 0.62, answers[qtype]
    counting = answers["counting"]
    assert counting["1"] / sum(counting.values()) < 0.52 and len(counting) >= 3, counting


def test_survey_names_every_object_left_to_right(scenes):
    from engine.data.synth_questions import SceneTextWriter, make_question

    scene = scenes[0]
    q = make_question("survey", scene, np.random.default_rng(0))
    assert q.answer == str(len(scene.objects)) and sorted(q.targets) == list(range(len(scene.objects)))
    lefts = [scene.objects[k].box[0] for k in q.targets]
    assert lefts == sorted(lefts)
    conclusion = SceneTextWriter(scene, q)._conclusion()
    assert conclusion == ", ".join(scene.objects[k].name for k in q.targets) + f": {q.answer}."


def test_cli_mix_weights_and_asks_each_kind_once_per_scene(tmp_path):
    main(["--out", str(tmp_path), "--n", "12", "--per-scene", "2", "--qtypes", "survey,survey,survey,locate"])
    records, _ = load_records(tmp_path / "records.jsonl")
    ids = [r.id for r in records]
    assert len(ids) == len(set(ids)) == 12
    assert {r.qtype for r in records} == {"survey", "locate"}


def test_ensure_split_generates_once_and_names_its_settings(tmp_path):
    from engine.data.synth import SynthSplit, ensure_split

    split = SynthSplit(records=4, seed=7, per_scene=2, qtypes="locate,survey", workers=1)
    out = ensure_split(tmp_path, split)
    assert out.name == split.folder_name() and "seed7-n4-q2" in out.name
    records, report = load_records(out / "records.jsonl")
    assert len(records) == 4 and not report.skipped
    stamp = (out / "records.jsonl").stat().st_mtime_ns
    assert ensure_split(tmp_path, split) == out and (out / "records.jsonl").stat().st_mtime_ns == stamp
    assert SynthSplit(records=4, seed=7, qtypes="locate").folder_name() != split.folder_name()
    with pytest.raises(ValueError, match="unknown kinds"):
        SynthSplit(records=4, qtypes="locate,lcoate").config()


def test_close_framing_makes_objects_larger_and_is_named_by_the_split():
    """The ``close`` framing exists to put an object on many of the tiny model's image tokens: its boxes must be
    several times larger than the default framing's, and a split of it must not share the default's folder."""
    from engine.data.synth import SynthConfig, SynthSplit, framed, make_scene

    def median_area(scenes: list) -> float:
        return float(np.median([(o.box[2] - o.box[0]) * (o.box[3] - o.box[1]) for s in scenes for o in s.objects]))

    default = [make_scene(3, i, SynthConfig()) for i in range(8)]
    close = [make_scene(3, i, framed(SynthConfig(), "close")) for i in range(8)]
    assert median_area(close) > 4 * median_area(default)
    assert all(2 <= len(s.objects) <= 3 for s in close)
    assert SynthSplit(records=4, framing="close").folder_name() != SynthSplit(records=4).folder_name()
    assert SynthSplit(records=4).config() == (SynthConfig(questions_per_scene=2),)
    with pytest.raises(ValueError, match="framing 'wide'"):
        SynthSplit(records=4, framing="wide").config()


def test_a_framing_mixture_takes_turns_scene_by_scene(tmp_path):
    """``close+default`` renders scene i with the (i mod 2)-th framing: the same scene ids as either framing alone,
    each scene identical to the one its framing alone would make, and its own folder name."""
    from engine.data.synth import SynthConfig, SynthSplit, ensure_split, framed, framed_mixture, make_scene

    split = SynthSplit(records=4, seed=7, per_scene=1, qtypes="locate", workers=1, framing="close+default")
    assert split.folder_name() not in {
        SynthSplit(records=4, seed=7, per_scene=1, qtypes="locate").folder_name(),
        SynthSplit(records=4, seed=7, per_scene=1, qtypes="locate", framing="close").folder_name(),
    }
    out = ensure_split(tmp_path, split)
    records, _ = load_records(out / "records.jsonl")
    assert [r.id for r in records] == [f"s7-{i:06d}-locate" for i in range(4)]
    base = SynthConfig(questions_per_scene=1, qtypes=("locate",))
    for i, r in enumerate(records):
        expected = make_scene(7, i, framed(base, "close" if i % 2 == 0 else "default"))
        assert [o["box"] for o in r.meta["scene"]["objects"]] == [o.box for o in expected.objects]
    with pytest.raises(ValueError, match="empty name"):
        framed_mixture(base, "close+")
    with pytest.raises(ValueError, match="framing 'wide'"):
        framed_mixture(base, "close+wide")
    with pytest.raises(ValueError, match="questions_per_scene"):
        generate_dataset(tmp_path / "bad", 2, 0, (base, SynthConfig(questions_per_scene=2)))
