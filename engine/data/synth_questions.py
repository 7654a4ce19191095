"""Question makers and the ground-truth trace-text writer for synthetic scenes (see engine.data.synth).

Each maker reads only the scene description (camera, objects' 3-D centres, sizes, 2-D boxes, visible depths) and
returns a :class:`Question` with its answer, answer type, options and target objects, or None when the scene
offers no unambiguous instance (comparisons keep a margin).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from engine.data.render import SHAPES, SceneObject
from engine.data.traces import StepContext

if TYPE_CHECKING:
    from engine.data.synth import Scene

QTYPES = (
    "left_right",
    "above_below",
    "nearer_farther",
    "counting",
    "size_compare",
    "attribute",
    "grounding",
    "locate",
)
"""The question types of the held-out splits (and of the default training mix)."""

CURRICULUM_QTYPES = ("survey",)
"""Training-only types: ``survey`` (find every object, named left to right) supervises every object's box,
depth and name in one trace, so a model that starts blind learns to see from fewer images."""


@dataclass
class Question:
    qtype: str
    question: str
    answer: str
    answer_type: str
    targets: list[int]
    options: dict[str, str] | None = None
    facts: dict[str, Any] = field(default_factory=dict)


def _the(ob: SceneObject) -> str:
    return f"the {ob.name}"


def _two_options(rng: np.random.Generator, a: SceneObject, b: SceneObject) -> tuple[dict[str, str], bool]:
    """Options A/B for objects a, b in random order; returns (options, a_is_A)."""
    a_first = bool(rng.random() < 0.5)
    first, second = (a, b) if a_first else (b, a)
    return {"A": _the(first), "B": _the(second)}, a_first


def _option_text(options: dict[str, str]) -> str:
    return " ".join(f"({k}) {v}" for k, v in options.items())


def _pairs(rng: np.random.Generator, n: int) -> list[tuple[int, int]]:
    pairs = [(i, j) for i in range(n) for j in range(n) if i != j]
    return [pairs[k] for k in rng.permutation(len(pairs))]


def _oriented(i: int, j: int, first_is_smaller: bool, values: list[float]) -> tuple[int, int]:
    """The pair (i, j) or (j, i), whichever has ``values[first] < values[second]`` equal to ``first_is_smaller``:
    the wanted answer is drawn first, so both answers of a two-way question are equally likely."""
    return (i, j) if (values[i] < values[j]) == first_is_smaller else (j, i)


def _q_left_right(scene: Scene, rng: np.random.Generator, balanced: bool = True) -> Question | None:
    us = [scene.camera.project(ob.center)[0] for ob in scene.objects]
    want_left = bool(rng.random() < 0.5) if balanced else None
    for i, j in _pairs(rng, len(us)):
        if abs(us[i] - us[j]) >= 0.08 * scene.camera.width:
            if want_left is not None:
                i, j = _oriented(i, j, want_left, us)
            a, b = scene.objects[i], scene.objects[j]
            ans = "left" if us[i] < us[j] else "right"
            return Question(
                "left_right",
                f"Is {_the(a)} to the left or to the right of {_the(b)}?",
                ans,
                "word",
                [i, j],
                facts={"u": [us[i] / scene.camera.width, us[j] / scene.camera.width]},
            )
    return None


def _q_above_below(scene: Scene, rng: np.random.Generator, balanced: bool = True) -> Question | None:
    vs = [scene.camera.project(ob.center)[1] for ob in scene.objects]
    want_above = bool(rng.random() < 0.5) if balanced else None
    for i, j in _pairs(rng, len(vs)):
        if abs(vs[i] - vs[j]) >= 0.06 * scene.camera.height:
            if want_above is not None:
                i, j = _oriented(i, j, want_above, vs)
            a, b = scene.objects[i], scene.objects[j]
            ans = "above" if vs[i] < vs[j] else "below"
            return Question(
                "above_below",
                f"In the image, is {_the(a)} above or below {_the(b)}?",
                ans,
                "word",
                [i, j],
                facts={"v": [vs[i] / scene.camera.height, vs[j] / scene.camera.height]},
            )
    return None


def _q_nearer(scene: Scene, rng: np.random.Generator) -> Question | None:
    zs = [scene.camera.project(ob.center)[2] for ob in scene.objects]
    for i, j in _pairs(rng, len(zs)):
        a, b = scene.objects[i], scene.objects[j]
        if zs[i] * 1.2 <= zs[j] and a.visible_depth < b.visible_depth:  # a is nearer
            options, near_is_a = _two_options(rng, a, b)
            q = f"Which object is nearer to the camera? {_option_text(options)}"
            return Question("nearer_farther", q, "A" if near_is_a else "B", "choice", [i, j], options)
    return None


def _q_counting(scene: Scene, rng: np.random.Generator, balanced: bool = True) -> Question | None:
    """The count is drawn uniformly from the counts the scene offers (of any shape or colour), then a shape or
    colour with that count: drawing the attribute first (``balanced`` False, how the bundled splits were made)
    makes most answers ``1`` (colours are rarely shared)."""
    if not balanced:
        by_shape = rng.random() < 0.5
        values = sorted({ob.shape if by_shape else ob.color for ob in scene.objects})
        value = values[int(rng.integers(len(values)))]
        idx = [k for k, ob in enumerate(scene.objects) if (ob.shape if by_shape else ob.color) == value]
        q = f"How many {value}s are there in the image?" if by_shape else f"How many {value} objects are there?"
        return Question("counting", q, str(len(idx)), "number", idx, facts={"attribute": value})
    by_count: dict[int, list[tuple[bool, str]]] = {}
    for by_shape in (True, False):
        for value in sorted({ob.shape if by_shape else ob.color for ob in scene.objects}):
            n = sum((ob.shape if by_shape else ob.color) == value for ob in scene.objects)
            by_count.setdefault(n, []).append((by_shape, value))
    counts = sorted(by_count)
    candidates = by_count[counts[int(rng.integers(len(counts)))]]
    by_shape, value = candidates[int(rng.integers(len(candidates)))]
    idx = [k for k, ob in enumerate(scene.objects) if (ob.shape if by_shape else ob.color) == value]
    q = f"How many {value}s are there in the image?" if by_shape else f"How many {value} objects are there?"
    return Question("counting", q, str(len(idx)), "number", idx, facts={"attribute": value})


def _q_size(scene: Scene, rng: np.random.Generator) -> Question | None:
    pairs = _pairs(rng, len(scene.objects))

    # prefer pairs where the truly larger object looks smaller (it is farther away)
    def area(ob: SceneObject) -> float:
        return (ob.box[2] - ob.box[0]) * (ob.box[3] - ob.box[1])

    good = [(i, j) for i, j in pairs if scene.objects[i].volume >= 2.0 * scene.objects[j].volume]
    good.sort(key=lambda p: area(scene.objects[p[0]]) >= area(scene.objects[p[1]]))
    if not good:
        return None
    i, j = good[0]
    options, big_is_a = _two_options(rng, scene.objects[i], scene.objects[j])
    q = f"Which object is larger in real size? {_option_text(options)}"
    return Question("size_compare", q, "A" if big_is_a else "B", "choice", [i, j], options)


def _q_attribute(scene: Scene, rng: np.random.Generator) -> Question | None:
    zs = [scene.camera.project(ob.center)[2] for ob in scene.objects]
    candidates = []
    for shape in SHAPES:
        idx = sorted((k for k, ob in enumerate(scene.objects) if ob.shape == shape), key=lambda k: zs[k])
        if idx and (len(idx) == 1 or zs[idx[-1]] >= 1.15 * zs[idx[-2]]):
            far = idx[-1]
            box = scene.objects[far].box
            candidates.append(((box[2] - box[0]) * (box[3] - box[1]), far))
    if not candidates:
        return None
    _, k = min(candidates)
    ob = scene.objects[k]
    q = f"What color is the {ob.shape} that is farthest from the camera?"
    return Question("attribute", q, ob.color, "word", [k])


def _fmt_box(box: list[float]) -> str:
    return "[" + ", ".join(f"{v:.3f}" for v in box) + "]"


def _q_grounding(scene: Scene, rng: np.random.Generator) -> Question | None:
    n = min(len(scene.objects), int(rng.integers(2, 5)))
    chosen = [int(k) for k in rng.choice(len(scene.objects), size=n, replace=False)]
    target = chosen[0]
    order = [chosen[k] for k in rng.permutation(n)]
    letters = "ABCD"
    options = {letters[m]: _fmt_box(scene.objects[k].box) for m, k in enumerate(order)}
    q = f"Which box contains {_the(scene.objects[target])}? {_option_text(options)}"
    return Question("grounding", q, letters[order.index(target)], "choice", [target], options)


def _q_locate(scene: Scene, rng: np.random.Generator) -> Question | None:
    k = int(rng.integers(len(scene.objects)))
    q = f"Give the bounding box of {_the(scene.objects[k])} as normalized [x1, y1, x2, y2]."
    return Question("locate", q, _fmt_box(scene.objects[k].box), "box", [k])


def _q_survey(scene: Scene, rng: np.random.Generator) -> Question | None:
    order = sorted(range(len(scene.objects)), key=lambda k: scene.objects[k].box[0])
    q = "Find every object in the image, from left to right. How many are there?"
    return Question("survey", q, str(len(order)), "number", order)


_MAKERS = {
    "left_right": _q_left_right,
    "above_below": _q_above_below,
    "nearer_farther": _q_nearer,
    "counting": _q_counting,
    "size_compare": _q_size,
    "attribute": _q_attribute,
    "grounding": _q_grounding,
    "locate": _q_locate,
    "survey": _q_survey,
}


_BALANCED = ("left_right", "above_below", "counting")


def make_question(qtype: str, scene: Scene, rng: np.random.Generator, balanced: bool = True) -> Question | None:
    """A question of kind ``qtype`` about ``scene`` (None when the scene has no unambiguous instance).

    balanced: draw the answer of two-way and counting questions before the objects (see the makers)."""
    if qtype not in _MAKERS:
        raise ValueError(f"unknown question kind {qtype!r}; expected one of {QTYPES + CURRICULUM_QTYPES}")
    if qtype in _BALANCED:
        return _MAKERS[qtype](scene, rng, balanced)
    return _MAKERS[qtype](scene, rng)


class SceneTextWriter:
    """Writes each trace step's text from the scene's ground truth (forward inference for synthetic data).

    Texts are terse on purpose: the embedded model has 3 M parameters and a few minutes of CPU, so every step says
    only what the next step needs: the objects to find (copied from the question), a correction after a
    distractor, and a conclusion whose numbers (centres or depths of the final boxes, in question order) decide
    the answer. About 430 bytes (~210 tiny-BPE tokens) per trace, half of a sentence-style trace.
    """

    def __init__(self, scene: Scene, q: Question):
        self.scene, self.q = scene, q

    def _compared(self) -> dict[str, SceneObject]:
        """Option letter -> object for the two-object choice questions (targets are [answer, other])."""
        q = self.q
        other = next(k for k in q.options if k != q.answer)
        return dict(
            sorted({q.answer: self.scene.objects[q.targets[0]], other: self.scene.objects[q.targets[1]]}.items())
        )

    def _targets(self) -> str:
        """The objects to find; for choice questions in option order, so the first step does not give the answer."""
        if self.q.qtype in ("nearer_farther", "size_compare"):
            names = [_the(ob) for ob in self._compared().values()]
        else:
            names = [_the(self.scene.objects[k]) for k in self.q.targets]
        return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]

    def _conclusion(self) -> str:
        q = self.q
        t = [self.scene.objects[k] for k in q.targets]
        if q.qtype == "left_right":
            u = q.facts["u"]
            return f"x {u[0]:.2f} vs {u[1]:.2f}: {q.answer}."
        if q.qtype == "above_below":
            v = q.facts["v"]
            return f"y {v[0]:.2f} vs {v[1]:.2f}: {q.answer}."
        if q.qtype in ("nearer_farther", "size_compare"):
            (a, ob_a), (b, ob_b) = self._compared().items()
            depths = f"{a} at depth {ob_a.visible_depth:.2f}, {b} at {ob_b.visible_depth:.2f}"
            if q.qtype == "nearer_farther":
                return f"{depths}; nearer: {q.answer}."
            return f"{depths}; larger for its distance: {q.answer}."
        if q.qtype == "counting":
            return f"{q.answer} found."
        if q.qtype == "attribute":
            return f"Farthest {t[0].shape}, depth {t[0].visible_depth:.2f}: {q.answer}."
        if q.qtype == "grounding":
            return f"It is in box {q.answer}."
        if q.qtype == "survey":
            return ", ".join(ob.name for ob in t) + f": {q.answer}."
        return f"Found at {q.answer}."

    def __call__(self, step: StepContext) -> str:
        if step.kind == "full":
            return "Find every object." if self.q.qtype == "survey" else f"Find {self._targets()}."
        if step.kind == "distractor":
            return "Not here; refocus."
        if step.kind == "target":
            return self._conclusion()
        return "Closer."
