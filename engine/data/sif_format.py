"""SIFThinker's text format: the prompt instruction, the canonical trace writer and a strict, total parser.

A response is

    <think><area>[{"bbox_2d":[x1,y1,x2,y2],"depth":d}, ...]</area><text>...</text> ... </think><answer>...</answer>

with area/text pairs strictly alternating (first an ``<area>``, last a ``</text>``). Every area is a JSON list of one
or more boxes; coordinates are normalised to [0, 1] with x2 > x1 and y2 > y1; ``depth`` is the box's mean depth in
[0, 1] (0 = nearest, 1 = farthest); every number has at most 3 decimals. These are the rules of the released
SIFThinker format check (extra fields in a box object are tolerated, as there), anchored at both ends as the
release's regex check is, except that JSON booleans are not numbers and only our eight tags are reserved in text.

The parser never evaluates text: it scans tags with one regular expression and reads area payloads with
``json.loads`` (NaN/Infinity rejected). It never raises on a ``str``; malformed input yields ``error`` naming the
area, box and field at fault, while areas, texts and the answer are still extracted leniently where possible.
"""

from __future__ import annotations

import json
import math
import re
from typing import NamedTuple

SIF_INSTRUCTION = (
    " Please first output the thinking process in <think> </think> tags, where bounding box is enclosed in"
    " <area> </area> tags and text analysis is enclosed in <text> </text> tags, alternating between them to"
    " iteratively refine the focused area. Then output the final answer in <answer> </answer> tags."
)
"""Appended verbatim to the question (it starts with a space), exactly as the released GRPO-SIF prompt does."""

DECIMALS = 3
TAGS = ("think", "area", "text", "answer")
_TAG_RE = re.compile(r"<(/?)(think|area|text|answer)>")


class DepthBox(NamedTuple):
    """A depth-enhanced box: normalised corners (x1, y1) top-left, (x2, y2) bottom-right; depth 0 = near, 1 = far."""

    x1: float
    y1: float
    x2: float
    y2: float
    depth: float


class ParsedResponse(NamedTuple):
    """Result of :func:`parse_response`.

    ``error`` is None iff the text is strictly well-formed; then ``len(areas) == len(texts) >= 1``, every area holds
    at least one valid box and ``answer`` is set. Otherwise ``areas`` holds, for every closed ``<area>`` block in
    order, the boxes that could be read from it (possibly none; ``depth`` is NaN where missing), ``texts`` every
    closed ``<text>`` block and ``answer`` the first closed ``<answer>`` block, or None.
    """

    areas: list[list[DepthBox]]
    texts: list[str]
    answer: str | None
    error: str | None


def sif_user_content(question: str, with_depth: bool = True) -> list[dict]:
    """User-turn content parts: ``Original image: <img>\\nDepth image: <img>\\n{question}{SIF_INSTRUCTION}``.

    Image parts are ``{"type": "image"}`` placeholders in order (RGB image first, then the colour-mapped depth);
    without depth the depth line is left out.
    """
    parts: list[dict] = [{"type": "text", "text": "Original image: "}, {"type": "image"}]
    if with_depth:
        parts += [{"type": "text", "text": "\nDepth image: "}, {"type": "image"}]
    parts.append({"type": "text", "text": "\n" + question + SIF_INSTRUCTION})
    return parts


def strip_instruction(text: str) -> str:
    """The question alone: ``text`` with a trailing :data:`SIF_INSTRUCTION` (and surrounding newlines) removed."""
    if text.endswith(SIF_INSTRUCTION):
        text = text[: -len(SIF_INSTRUCTION)]
    return text.strip("\n")


# ----------------------------------------------------------------------------------------------------------- writer


def _fmt(value: float) -> str:
    """Canonical number: rounded to 3 decimals, shortest repr (``0.5``, ``1.0``, ``0.125``); -0.0 becomes 0.0."""
    return repr(round(float(value), DECIMALS) + 0.0)


def _check_free_text(kind: str, text: str) -> None:
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"{kind} must be a non-empty string, got {text!r}")
    match = _TAG_RE.search(text)
    if match:
        raise ValueError(f"{kind} contains the reserved tag {match.group(0)!r}")


def format_area(boxes: list[DepthBox], where: str = "area") -> str:
    """``<area>[{"bbox_2d":[x1,y1,x2,y2],"depth":d},...]</area>`` for one or more boxes (values rounded to 3 dp).

    Raises ValueError naming ``where`` and the box index if a box is invalid after rounding.
    """
    if not boxes:
        raise ValueError(f"{where}: needs at least one box")
    items = []
    for j, box in enumerate(boxes):
        if len(box) != 5:
            raise ValueError(f"{where} box {j}: expected (x1, y1, x2, y2, depth), got {box!r}")
        vals = [round(float(v), DECIMALS) + 0.0 for v in box]
        problem = _box_problem(vals[:4], vals[4])
        if problem:
            raise ValueError(f"{where} box {j}: {problem} (after rounding to {DECIMALS} decimals: {vals})")
        coords = ",".join(_fmt(v) for v in vals[:4])
        items.append(f'{{"bbox_2d":[{coords}],"depth":{_fmt(vals[4])}}}')
    return "<area>[" + ",".join(items) + "]</area>"


def format_response(areas: list[list[DepthBox]], texts: list[str], answer: str) -> str:
    """The canonical SIF response for area/text pairs and an answer. Values are rounded to 3 decimals.

    Raises ValueError (naming the area/box/text) if the pieces cannot form a well-formed response; for inputs
    already on the 3-decimal grid, ``parse_response(format_response(a, t, x))`` returns exactly ``(a, t, x)``.
    """
    if len(areas) != len(texts) or not areas:
        raise ValueError(f"need equally many areas and texts, at least one each; got {len(areas)} and {len(texts)}")
    body = []
    for i, (boxes, text) in enumerate(zip(areas, texts)):
        body.append(format_area(boxes, where=f"area {i}"))
        _check_free_text(f"text {i}", text)
        body.append(f"<text>{text}</text>")
    _check_free_text("answer", answer)
    return "<think>" + "".join(body) + f"</think><answer>{answer}</answer>"


# ----------------------------------------------------------------------------------------------------------- parser


def _box_problem(coords: list[float], depth: float) -> str | None:
    """Why normalised coords/depth are invalid, or None."""
    for name, v in zip(("x1", "y1", "x2", "y2", "depth"), (*coords, depth)):
        if not (0.0 <= v <= 1.0):
            return f"{name}={v!r} outside [0, 1]"
    x1, y1, x2, y2 = coords
    if not x2 > x1:
        return f"x2={x2!r} must exceed x1={x1!r}"
    if not y2 > y1:
        return f"y2={y2!r} must exceed y1={y1!r}"
    return None


def _reject_constant(name: str) -> float:
    raise ValueError(f"non-finite number {name} is not allowed")


def _load_json(payload: str) -> tuple[object, str | None]:
    """json.loads that never raises: (value, None) or (None, reason)."""
    try:
        return json.loads(payload, parse_constant=_reject_constant), None
    except (ValueError, RecursionError) as exc:  # JSONDecodeError is a ValueError
        return None, f"invalid JSON ({str(exc)[:120]})"


def _is_number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _read_box(item: object, strict: bool) -> tuple[DepthBox | None, str | None]:
    """One box object. Strict: every rule; lenient: 4 finite coords, depth NaN if absent."""
    if not isinstance(item, dict):
        return None, f"expected an object, got {type(item).__name__}"
    bbox = item.get("bbox_2d")
    if not isinstance(bbox, list) or len(bbox) != 4 or not all(_is_number(v) for v in bbox):
        return None, f"field 'bbox_2d' must be a list of 4 numbers, got {str(bbox)[:80]}"
    coords = [float(v) for v in bbox]
    depth = item.get("depth")
    if not _is_number(depth):
        if strict:
            what = "missing" if "depth" not in item else f"must be a number, got {str(depth)[:40]}"
            return None, f"field 'depth' {what}"
        depth = math.nan
    depth = float(depth)
    if strict:
        problem = _box_problem(coords, depth)
        if problem:
            return None, problem
        for name, v in zip(("x1", "y1", "x2", "y2", "depth"), (*coords, depth)):
            if round(v, DECIMALS) != v:
                return None, f"{name}={v!r} has more than {DECIMALS} decimals"
    return DepthBox(*coords, depth), None


def _read_area(payload: str, strict: bool) -> tuple[list[DepthBox], str | None]:
    """Boxes of one area payload and the first strict-rule violation (or None). Lenient mode keeps readable boxes."""
    data, err = _load_json(payload)
    if err:
        return [], err
    if isinstance(data, dict):  # a lone object is readable leniently but not well-formed
        data_list, first_err = [data], "payload must be a JSON list of boxes, got an object"
    elif isinstance(data, list):
        data_list, first_err = data, None if data else "empty list of boxes"
    else:
        return [], f"payload must be a JSON list of boxes, got {type(data).__name__}"
    boxes = []
    for j, item in enumerate(data_list):
        box, box_err = _read_box(item, strict=True)
        if box_err is not None:
            first_err = first_err or f"box {j}: {box_err}"
            box, _ = _read_box(item, strict=False)
        if box is not None:
            boxes.append(box)
    return boxes, first_err


def _strict_error(text: str, tokens: list[re.Match]) -> str | None:
    """First violation of the tag grammar, or None; area payloads are checked separately."""

    def describe(k: int) -> str:
        return f"{tokens[k].group(0)} at char {tokens[k].start()}" if k < len(tokens) else "end of text"

    def gap_ok(a: int, b: int) -> bool:
        return not text[a:b].strip()

    if not tokens or tokens[0].group(0) != "<think>":
        return f"expected <think> first, found {describe(0)}"
    if not gap_ok(0, tokens[0].start()):
        return "text before <think>"
    k, pair, pos = 1, 0, tokens[0].end()
    while True:
        tag = tokens[k].group(0) if k < len(tokens) else None
        if tag == "</think>" and pair > 0:
            break
        if tag != "<area>":
            want = "<area>" if pair == 0 else "<area> or </think>"
            return f"expected {want} after {'<think>' if pair == 0 else f'text {pair - 1}'}, found {describe(k)}"
        if not gap_ok(pos, tokens[k].start()):
            return f"stray text before area {pair}"
        for offset, want in enumerate(("</area>", "<text>", "</text>")):
            got = tokens[k + 1 + offset].group(0) if k + 1 + offset < len(tokens) else None
            if got != want:
                return f"area {pair}: expected {want}, found {describe(k + 1 + offset)}"
        if not gap_ok(tokens[k + 1].end(), tokens[k + 2].start()):
            return f"area {pair}: stray text between </area> and <text>"
        if not text[tokens[k + 2].end() : tokens[k + 3].start()].strip():
            return f"text {pair} is empty"
        pos, k, pair = tokens[k + 3].end(), k + 4, pair + 1
    if not gap_ok(pos, tokens[k].start()):
        return f"stray text after text {pair - 1}"
    for offset, want in enumerate(("<answer>", "</answer>")):
        got = tokens[k + 1 + offset].group(0) if k + 1 + offset < len(tokens) else None
        if got != want:
            return f"expected {want} after </think>, found {describe(k + 1 + offset)}"
    if len(tokens) > k + 3:
        return f"unexpected {describe(k + 3)} after </answer>"
    if not gap_ok(tokens[k].end(), tokens[k + 1].start()):
        return "stray text between </think> and <answer>"
    if not text[tokens[k + 1].end() : tokens[k + 2].start()].strip():
        return "answer is empty"
    if not gap_ok(tokens[k + 2].end(), len(text)):
        return "text after </answer>"
    return None


def _closed_blocks(text: str, tokens: list[re.Match], name: str) -> list[str]:
    """Contents of every ``<name>`` token immediately followed by a ``</name>`` token (linear, no backtracking)."""
    out = []
    for a, b in zip(tokens, tokens[1:]):
        if a.group(0) == f"<{name}>" and b.group(0) == f"</{name}>":
            out.append(text[a.end() : b.start()])
    return out


def parse_response(text: str) -> ParsedResponse:
    """Parse a model response; never raises on a ``str``. See :class:`ParsedResponse` for the result."""
    if not isinstance(text, str):
        return ParsedResponse([], [], None, f"expected str, got {type(text).__name__}")
    tokens = list(_TAG_RE.finditer(text))
    error = _strict_error(text, tokens)
    areas = []
    for i, payload in enumerate(_closed_blocks(text, tokens, "area")):
        boxes, area_err = _read_area(payload, strict=True)
        if area_err and error is None:
            error = f"area {i}: {area_err}"
        areas.append(boxes)
    texts = _closed_blocks(text, tokens, "text")
    answers = _closed_blocks(text, tokens, "answer")
    return ParsedResponse(areas, texts, answers[0] if answers else None, error)


def last_area_boxes(partial_text: str) -> list[DepthBox] | None:
    """Valid boxes of the area ``partial_text`` ends with (trailing whitespace allowed), for the crop hook.

    Returns None when the text does not end with ``</area>`` or that area holds no box with finite coords in
    [0, 1], x2 > x1, y2 > y1 and depth in [0, 1]; invalid boxes in an otherwise readable area are dropped.
    Decimals are not checked here (that is the format reward's job).
    """
    if not isinstance(partial_text, str):
        return None
    stripped = partial_text.rstrip()
    if not stripped.endswith("</area>"):
        return None
    start = stripped.rfind("<area>")
    if start < 0:
        return None
    boxes, _ = _read_area(stripped[start + len("<area>") : -len("</area>")], strict=False)
    valid = [b for b in boxes if _box_problem(list(b[:4]), b.depth) is None]
    return valid or None
