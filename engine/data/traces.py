"""Reverse-expansion, forward-inference trace builder (how the SIFThinker release builds SIF-50K).

Reverse expansion, from the ground-truth boxes outwards:

1. ``target``: the ground-truth boxes.
2. ``expanded``: every box grown once, on each side, by a step sized so that ``num_expansions`` such steps reach
   the image border (the per-axis largest gap divided by ``num_expansions``, at least one pixel); boxes that
   then overlap are merged into their enclosing box until none overlap.
3. ``union``: the enclosing box of the expanded boxes, when there are several.
4. ``distractor`` (probability ``distractor_prob``): a box of the union's size moved next to it (left, right,
   up, down or diagonally) with IoU < 0.001 and at least a quarter of its area inside the image. In the chain it
   comes right after the full image, so the trace looks at a wrong region first and then corrects itself.
5. ``full``: the whole image.

Reversed, that is a coarse-to-fine chain of 3–5 areas (fewer when steps coincide, e.g. a target that already fills
the image) in which each area contains the next one, the distractor excepted. Boxes are rounded to 3 decimals
outwards (so containment survives rounding); every box carries its mean depth over the depth map.

Forward inference: a ``describe(StepContext) -> str`` callable writes each step's text: the synthetic generator
passes one that reads its scene description; :class:`EndpointWriter` wraps any text-generation endpoint.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from engine.data.boxes import Box, box_mean_depth, contains, enclosing_box, iou, round_outward
from engine.data.schema import TraceStep
from engine.data.sif_format import DepthBox

FULL_IMAGE: Box = (0.0, 0.0, 1.0, 1.0)
STEP_KINDS = ("full", "distractor", "union", "expanded", "target")


@dataclass(frozen=True)
class TraceConfig:
    """Knobs of the builder (defaults follow the release)."""

    num_expansions: int = 5
    distractor_prob: float = 0.5


@dataclass(frozen=True)
class StepContext:
    """What a text writer knows about one step of the coarse-to-fine chain."""

    index: int
    kind: str
    boxes: tuple[DepthBox, ...]
    next_boxes: tuple[DepthBox, ...] | None
    next_kind: str | None
    question: str
    answer: str


def _overlap(a: Sequence[float], b: Sequence[float]) -> bool:
    return a[0] < b[2] and a[2] > b[0] and a[1] < b[3] and a[3] > b[1]


def merge_overlapping(boxes: Sequence[Box]) -> list[Box]:
    """Replace overlapping boxes by their enclosing box until no two overlap (order of first appearance kept)."""
    out = list(boxes)
    changed = True
    while changed:
        changed = False
        for i in range(len(out)):
            for j in range(i + 1, len(out)):
                if _overlap(out[i], out[j]):
                    out[i] = enclosing_box([out[i], out[j]])
                    del out[j]
                    changed = True
                    break
            if changed:
                break
    return out


def expand_once(boxes: Sequence[Box], width: int, height: int, steps_left: int) -> list[Box]:
    """Grow every box by the step that reaches the border in ``steps_left`` steps, merge overlaps, round outwards."""
    gap_x = max(max(b[0], 1.0 - b[2]) for b in boxes)
    gap_y = max(max(b[1], 1.0 - b[3]) for b in boxes)
    sx = max(gap_x / steps_left, 1.0 / width)
    sy = max(gap_y / steps_left, 1.0 / height)
    grown = [(max(0.0, b[0] - sx), max(0.0, b[1] - sy), min(1.0, b[2] + sx), min(1.0, b[3] + sy)) for b in boxes]
    return [round_outward(b) for b in merge_overlapping(grown)]


def pick_distractor(base: Box, rng: np.random.Generator) -> Box | None:
    """A box of ``base``'s size next to it with IoU < 0.001 and ≥ 1/4 of its area in the image, or None."""
    w, h = base[2] - base[0], base[3] - base[1]
    gap = 0.01
    moves = [(dx, dy) for dx in (-1, 0, 1) for dy in (-1, 0, 1) if (dx, dy) != (0, 0)]
    candidates = []
    for dx, dy in moves:
        x1 = base[0] + dx * (w + gap)
        y1 = base[1] + dy * (h + gap)
        cand = (max(0.0, x1), max(0.0, y1), min(1.0, x1 + w), min(1.0, y1 + h))
        cand = tuple(round(v, 3) for v in cand)
        if cand[2] <= cand[0] or cand[3] <= cand[1]:
            continue
        if (cand[2] - cand[0]) * (cand[3] - cand[1]) < 0.25 * w * h or iou(cand, base) >= 0.001:
            continue
        candidates.append(cand)
    if not candidates:
        return None
    return candidates[int(rng.integers(len(candidates)))]


def area_chain(
    gt_boxes: Sequence[Box], width: int, height: int, rng: np.random.Generator, config: TraceConfig = TraceConfig()
) -> list[tuple[str, list[Box]]]:
    """The coarse-to-fine chain ``[(kind, boxes), ...]``: full, [distractor], [union], expanded, target."""
    if not gt_boxes:
        raise ValueError("the trace builder needs at least one ground-truth box")
    target = [tuple(float(v) for v in b) for b in gt_boxes]
    expanded = expand_once(target, width, height, config.num_expansions)
    reverse: list[tuple[str, list[Box]]] = [("target", target), ("expanded", expanded)]
    union = enclosing_box(expanded)
    if len(expanded) > 1:
        reverse.append(("union", [union]))
    if rng.random() < config.distractor_prob:
        distractor = pick_distractor(union, rng)
        if distractor is not None:
            reverse.append(("distractor", [distractor]))
    reverse.append(("full", [FULL_IMAGE]))
    chain: list[tuple[str, list[Box]]] = []
    for kind, boxes in reversed(reverse):
        if chain and sorted(chain[-1][1]) == sorted(boxes):
            chain[-1] = (kind if kind == "target" else chain[-1][0], boxes)
            continue
        chain.append((kind, boxes))
    return chain


def is_nested(chain: Sequence[tuple[str, Sequence[Sequence[float]]]]) -> bool:
    """True when every non-distractor area contains each box of the next non-distractor area."""
    regions = [boxes for kind, boxes in chain if kind != "distractor"]
    return all(any(contains(a, b) for a in outer) for outer, inner in zip(regions, regions[1:]) for b in inner)


def _depth_box(box: Box, depth: np.ndarray) -> DepthBox:
    d = min(1.0, max(0.0, round(box_mean_depth(depth, box), 3)))
    return DepthBox(*box, d)


def build_trace(
    gt_boxes: Sequence[Box],
    depth: np.ndarray,
    question: str,
    answer: str,
    describe: Callable[[StepContext], str],
    rng: np.random.Generator,
    config: TraceConfig = TraceConfig(),
) -> list[TraceStep]:
    """Build the chain for ``gt_boxes`` on a depth map [H, W] (0 = near) and let ``describe`` write every step."""
    height, width = depth.shape[-2:]
    chain = area_chain(gt_boxes, width, height, rng, config)
    with_depth = [(kind, tuple(_depth_box(b, depth) for b in boxes)) for kind, boxes in chain]
    steps = []
    for i, (kind, boxes) in enumerate(with_depth):
        nxt = with_depth[i + 1] if i + 1 < len(with_depth) else (None, None)
        text = describe(StepContext(i, kind, boxes, nxt[1], nxt[0], question, answer))
        steps.append(TraceStep(boxes, clean_step_text(text), kind))
    return steps


_RESERVED = re.compile(r"</?(?:think|area|text|answer)>")


def clean_step_text(text: str) -> str:
    """Step text without SIF tags or surrounding whitespace; raises ValueError when nothing is left."""
    cleaned = _RESERVED.sub(" ", text).strip()
    if not cleaned:
        raise ValueError(f"step text is empty after cleaning: {text!r}")
    return cleaned


def _fmt_boxes(boxes: Sequence[DepthBox]) -> str:
    return "; ".join(f"[{b.x1:.3f}, {b.y1:.3f}, {b.x2:.3f}, {b.y2:.3f}] at depth {b.depth:.3f}" for b in boxes)


class EndpointWriter:
    """Forward inference through any text-generation endpoint: ``generate(prompt) -> str``.

    The prompt tells the model the question, the final answer, the region it is focusing on (boxes and mean
    depths, 0 = near) and where the focus goes next, and asks for one or two sentences of analysis. An image-aware
    endpoint can close over the record's image; the callable is all this class needs.
    """

    def __init__(self, generate: Callable[[str], str]):
        self.generate = generate

    def prompt(self, step: StepContext) -> str:
        lines = [
            f"Question: {step.question}",
            f"Final answer: {step.answer}",
            f"Current focus (step {step.index + 1}, {step.kind}): {_fmt_boxes(step.boxes)} "
            "(normalised [x1, y1, x2, y2]; depth 0 = nearest, 1 = farthest).",
        ]
        if step.next_boxes is None:
            lines.append("This is the final focus: state what it shows that answers the question.")
        elif step.kind == "distractor":
            lines.append(f"This region is not relevant; explain why and move to {_fmt_boxes(step.next_boxes)}.")
        else:
            lines.append(f"Next focus: {_fmt_boxes(step.next_boxes)}. Explain what you see and why you look there.")
        lines.append("Reply with one or two plain sentences, without tags.")
        return "\n".join(lines)

    def __call__(self, step: StepContext) -> str:
        return self.generate(self.prompt(step))
