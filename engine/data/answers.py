"""Rule-based answer normalisation and scoring, shared by the answer reward and the evaluation.

Answer types (``Record.answer_type``):

- ``choice``: a letter A–Z (``B``, ``(B)``, ``B.``, ``Option B``, ``The answer is B``) or the option's text. A gold
  answer may carry its text (``"(B) the red cube"``); then either the letter or the text matches.
- ``number``: the first number in the text (digits, ``1,024``, ``-3.5``, or an English number word up to twenty).
  Integer gold answers (counts) must match exactly; others within ``rel_tol`` (default 5 %).
- ``word``: case, punctuation, articles and surrounding whitespace are ignored; a small synonym table maps
  spatial/comparative words to one canonical form (``closer`` → ``nearer``, ``gray`` → ``grey``, ``true`` → ``yes``).
- ``box``: four numbers ``[x1, y1, x2, y2]`` normalised to [0, 1]; the score is the IoU with the gold box.

Scores are in [0, 1]; everything is parsed with regular expressions, nothing is evaluated.
"""

from __future__ import annotations

import math
import re

ANSWER_TYPES = ("choice", "number", "word", "box")

_NUMBER_WORDS = {
    w: i
    for i, w in enumerate(
        "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
        "seventeen eighteen nineteen twenty".split()
    )
}
_NUMBER_WORDS["no"] = 0
_NUMBER_WORDS["none"] = 0

_SYNONYMS = {
    "closer": "nearer",
    "near": "nearer",
    "nearest": "nearer",
    "closest": "nearer",
    "further": "farther",
    "far": "farther",
    "farthest": "farther",
    "furthest": "farther",
    "bigger": "larger",
    "big": "larger",
    "largest": "larger",
    "biggest": "larger",
    "smallest": "smaller",
    "small": "smaller",
    "littler": "smaller",
    "gray": "grey",
    "true": "yes",
    "correct": "yes",
    "false": "no",
    "incorrect": "no",
    "higher": "above",
    "over": "above",
    "lower": "below",
    "under": "below",
    "beneath": "below",
    "leftmost": "left",
    "rightmost": "right",
}
_ARTICLES = {"a", "an", "the"}
_FILLER = {"it", "is", "its", "on", "to", "of", "side", "answer", "object", "one"}

_LETTER_PATTERNS = [
    re.compile(r"^\s*\(?([A-Z])\)?\s*[.:)]?\s*$"),
    re.compile(r"^\s*\(([A-Z])\)"),
    re.compile(r"^\s*([A-Z])[.:)]\s"),
    re.compile(r"\b(?i:answer|option|choice)\s*(?i:is)?\s*:?\s*\(?([A-Z])\)?(?![A-Za-z])"),
    re.compile(r"\b(?i:option|choice)\s*\(?([a-z])\)?(?![A-Za-z])"),
]
_NUMBER_RE = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|[-+]?\.\d+")
_BOX_NUMBER_RE = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")


def _check_type(answer_type: str) -> None:
    if answer_type not in ANSWER_TYPES:
        raise ValueError(f"unknown answer_type {answer_type!r}; expected one of {ANSWER_TYPES}")


def choice_letter(text: str) -> str | None:
    """The option letter a choice answer names, or None."""
    for pattern in _LETTER_PATTERNS:
        m = pattern.search(text)
        if m:
            return m.group(1).upper()
    return None


def _choice_text(text: str) -> str:
    """Option text without a leading ``(B)``/``B.`` label, word-normalised."""
    stripped = re.sub(r"^\s*(?:\([A-Z]\)|[A-Z][.:)])\s*", "", text)
    return _normalize_words(stripped)


def parse_number(text: str) -> float | None:
    """The first number in ``text`` (digits or an English number word up to twenty), or None."""
    m = _NUMBER_RE.search(text)
    words = re.findall(r"[a-z]+", text.lower())
    word_value = next((_NUMBER_WORDS[w] for w in words if w in _NUMBER_WORDS and w not in ("no", "none")), None)
    if m:
        return float(m.group(0).replace(",", ""))
    if word_value is not None:
        return float(word_value)
    if "no" in words or "none" in words:
        return 0.0
    return None


def parse_box(text: str) -> tuple[float, float, float, float] | None:
    """The first four numbers of ``text`` as a valid normalised box (x2 > x1, y2 > y1, all in [0, 1]), or None."""
    nums = _BOX_NUMBER_RE.findall(text)
    if len(nums) < 4:
        return None
    x1, y1, x2, y2 = (float(v) for v in nums[:4])
    if not all(math.isfinite(v) and 0.0 <= v <= 1.0 for v in (x1, y1, x2, y2)) or x2 <= x1 or y2 <= y1:
        return None
    return x1, y1, x2, y2


def box_iou(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    """IoU of two [x1, y1, x2, y2] boxes."""
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _normalize_words(text: str) -> str:
    words = re.findall(r"[a-z0-9]+", text.lower())
    words = [_SYNONYMS.get(w, w) for w in words if w not in _ARTICLES]
    content = [w for w in words if w not in _FILLER]
    return " ".join(content or words)


def normalize_answer(text: str, answer_type: str) -> str:
    """Canonical string form of an answer: ``B`` / option text, ``3`` / ``2.5``, ``nearer``, ``[0.1,0.2,0.3,0.4]``.

    Returns ``""`` when nothing of the type can be read from ``text``.
    """
    _check_type(answer_type)
    if answer_type == "choice":
        letter = choice_letter(text)
        return letter if letter is not None else _choice_text(text)
    if answer_type == "number":
        value = parse_number(text)
        if value is None:
            return ""
        return str(int(value)) if value.is_integer() else repr(value)
    if answer_type == "box":
        box = parse_box(text)
        return "" if box is None else "[" + ",".join(repr(round(v, 3) + 0.0) for v in box) + "]"
    return _normalize_words(text)


def answers_match(
    pred: str | None, gold: str, answer_type: str, *, rel_tol: float = 0.05, options: dict[str, str] | None = None
) -> float:
    """Score in [0, 1] of a predicted answer against the gold one (see the module docstring for the rules).

    ``options`` (letter → option text) lets a choice answer given as text match a gold letter. A missing
    prediction (None or empty) scores 0.
    """
    _check_type(answer_type)
    if pred is None or not pred.strip():
        return 0.0
    if answer_type == "choice":
        gold_letter = choice_letter(gold)
        pred_letter = choice_letter(pred)
        if gold_letter is not None and pred_letter is not None:
            return float(pred_letter == gold_letter)
        pred_text = _choice_text(pred)
        gold_texts = {_choice_text(gold)}
        if options and gold_letter in options:
            gold_texts.add(_normalize_words(options[gold_letter]))
        if gold_letter is not None and gold_letter.lower() == pred_text:
            return 1.0
        return float(bool(pred_text) and pred_text in gold_texts)
    if answer_type == "number":
        p, g = parse_number(pred), parse_number(gold)
        if p is None or g is None:
            return 0.0
        if g.is_integer():
            return float(p == g)
        return float(abs(p - g) <= rel_tol * abs(g) + 1e-9)
    if answer_type == "box":
        p, g = parse_box(pred), parse_box(gold)
        return box_iou(p, g) if p is not None and g is not None else 0.0
    p, g = _normalize_words(pred), _normalize_words(gold)
    return float(bool(p) and p == g)
