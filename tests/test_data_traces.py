"""Reverse-expansion trace builder: step sizes, merging, distractor, nesting, depths, pluggable text writer."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.data.traces import EndpointWriter, TraceConfig, area_chain, build_trace, expand_once


def test_expand_step_reaches_the_border_in_n_steps():
    # gap 0.4 on every side, 5 steps -> grow 0.08 per side
    assert expand_once([(0.4, 0.4, 0.6, 0.6)], 100, 100, 5) == [(0.32, 0.32, 0.68, 0.68)]
    # per axis: x gap 0.5 -> 0.1; y gap 0.2 -> 0.04
    assert expand_once([(0.0, 0.2, 0.5, 0.8)], 100, 100, 5) == [(0.0, 0.16, 0.6, 0.84)]
    # at least one pixel
    assert expand_once([(0.0, 0.0, 1.0, 0.999)], 10, 1000, 5) == [(0.0, 0.0, 1.0, 1.0)]


def test_overlapping_boxes_merge_after_growth():
    boxes = [(0.1, 0.1, 0.2, 0.2), (0.22, 0.1, 0.3, 0.2), (0.8, 0.8, 0.9, 0.9)]
    grown = expand_once(boxes, 1000, 1000, 5)  # step 0.16 (x) / 0.16 (y): all three touch
    assert grown == [(0.0, 0.0, 1.0, 1.0)] or len(grown) < 3
    near_pair = expand_once(boxes[:2], 1000, 1000, 50)  # small step: only the first two merge
    assert len(near_pair) == 1 and near_pair[0][0] < 0.1 and near_pair[0][2] > 0.3


def test_chain_kinds_and_distractor():
    gt = [(0.45, 0.45, 0.5, 0.5)]
    rng = np.random.default_rng(0)
    with_d = area_chain(gt, 200, 200, rng, TraceConfig(distractor_prob=1.0))
    assert [k for k, _ in with_d] == ["full", "distractor", "expanded", "target"]
    without = area_chain(gt, 200, 200, rng, TraceConfig(distractor_prob=0.0))
    assert [k for k, _ in without] == ["full", "expanded", "target"]
    two = area_chain([(0.3, 0.1, 0.35, 0.15), (0.6, 0.8, 0.65, 0.85)], 200, 200, rng, TraceConfig(distractor_prob=0))
    assert [k for k, _ in two] == ["full", "union", "expanded", "target"]
    assert area_chain([(0.0, 0.0, 1.0, 1.0)], 200, 200, rng) == [("target", [(0.0, 0.0, 1.0, 1.0)])]
    with pytest.raises(ValueError, match="at least one"):
        area_chain([], 10, 10, rng)


def _inside(outer, inner):
    return outer[0] <= inner[0] and outer[1] <= inner[1] and outer[2] >= inner[2] and outer[3] >= inner[3]


def _iou(a, b):
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


@st.composite
def gt_boxes(draw):
    out = []
    for _ in range(draw(st.integers(1, 3))):
        x1, y1 = draw(st.integers(0, 900)), draw(st.integers(0, 900))
        w, h = draw(st.integers(5, 100)), draw(st.integers(5, 100))
        out.append((x1 / 1000, y1 / 1000, min(1000, x1 + w) / 1000, min(1000, y1 + h) / 1000))
    return out


@settings(max_examples=60, deadline=None)
@given(gt_boxes(), st.integers(0, 2**31 - 1), st.sampled_from([0.0, 1.0]))
def test_built_traces_are_nested_and_end_at_the_target(gt, seed, p):
    depth = np.random.default_rng(seed).random((48, 64)).astype(np.float32)
    texts = []
    steps = build_trace(
        gt,
        depth,
        "q?",
        "a",
        lambda s: texts.append(s) or f"step {s.index} {s.kind}",
        np.random.default_rng(seed),
        TraceConfig(distractor_prob=p),
    )
    assert 3 <= len(steps) <= 5 and [tuple(b[:4]) for b in steps[-1].boxes] == gt
    assert steps[0].boxes[0][:4] == (0.0, 0.0, 1.0, 1.0)
    assert [s.text for s in steps] == [f"step {i} {s.kind}" for i, s in enumerate(steps)]
    assert texts[-1].next_boxes is None and texts[0].next_boxes == steps[1].boxes
    chain = [s for s in steps if s.kind != "distractor"]
    for outer, inner in zip(chain, chain[1:]):
        assert set(outer.boxes) != set(inner.boxes)
        assert all(any(_inside(o[:4], i[:4]) for o in outer.boxes) for i in inner.boxes)
    for k, s in enumerate(steps):
        if s.kind == "distractor":
            nxt = steps[k + 1].boxes
            union = (min(b[0] for b in nxt), min(b[1] for b in nxt), max(b[2] for b in nxt), max(b[3] for b in nxt))
            assert _iou(s.boxes[0], union) < 0.001
        for b in s.boxes:
            assert all(round(v, 3) == v for v in b)
            c0, r0 = math.floor(b[0] * 64), math.floor(b[1] * 48)
            c1, r1 = max(math.ceil(b[2] * 64), c0 + 1), max(math.ceil(b[3] * 48), r0 + 1)
            assert b.depth == pytest.approx(float(depth[r0:r1, c0:c1].mean()), abs=5e-4 + 1e-7)


def test_endpoint_writer_prompts_and_cleans():
    prompts = []

    def generate(prompt: str) -> str:
        prompts.append(prompt)
        return " <text>I see a cup.</text> "

    steps = build_trace(
        [(0.4, 0.4, 0.5, 0.5)],
        np.zeros((10, 10), np.float32),
        "Where is the cup?",
        "left",
        EndpointWriter(generate),
        np.random.default_rng(0),
        TraceConfig(distractor_prob=0.0),
    )
    assert [s.text for s in steps] == ["I see a cup."] * 3
    assert "Question: Where is the cup?" in prompts[0] and "Final answer: left" in prompts[0]
    assert "Next focus: [0." in prompts[0] and "This is the final focus" in prompts[-1]
    with pytest.raises(ValueError, match="empty after cleaning"):
        build_trace(
            [(0.4, 0.4, 0.5, 0.5)],
            np.zeros((10, 10), np.float32),
            "q",
            "a",
            EndpointWriter(lambda p: "<area></area>"),
            np.random.default_rng(0),
        )
