"""GRPO-SIF rewards: format, answer (with progress), grounding (with progress) and depth, each its own function.

Two profiles, ``rl.rewards.profile``: ``strict`` (the default; the engine's own rules) and ``release`` (the
released SIFThinker's reward code term by term: ``GRPO-SIF/.../vlm_modules/qwen_module.py`` and the progress memory
of its ``grpo_trainer.py``). docs/rewards.md writes both out side by side with every deviation of ``strict`` and
its reason. Every completion is scored against its record's ground truth (``RewardTarget``).

**strict**, with ``p`` the parsed completion (``engine.data.sif_format.parse_response``):

* **format** ``r_f ∈ {0, 1}``: 1 iff the response is strictly well-formed (``p.error is None``: ``<think>`` holds
  alternating ``<area>``/``<text>`` pairs starting with an area, then ``<answer>``), it has at least one area,
  every box is valid (finite, ``0 ≤ x1 < x2 ≤ 1``, ``0 ≤ y1 < y2 ≤ 1``, ``0 ≤ depth ≤ 1``) and the answer is
  non-empty.
* **answer** ``r_a = s + max(0, s − s_prev)``: ``s ∈ [0, 1]`` is the rule-based match of the extracted answer with
  the reference by answer type (``engine.data.answers.answers_match``), or an optional judge callable for the
  answer types configured to use it; a missing answer scores ``s = 0`` (never the reference). ``s_prev`` is this
  prompt's group-mean ``s`` the last time it was seen (``AnswerProgress``, checkpointable); on a prompt's first
  visit there is no progress term (``s_prev = s``).
* **grounding** ``r_g = IoU_end + max(0, IoU_end − IoU_start)``: IoU of a box set with the ground-truth boxes is
  ``box_set_iou`` (mean of the exact union-region IoU and the Hungarian-matched IoU over ``max(|P|, |G|)``, see
  ``engine.rl.iou``), invalid boxes dropped; end = the last area, start = the first area that is not the full image
  (no such area: no progress term). No area or no ground-truth boxes: 0.
* **depth** ``r_d``: the fraction of *all* predicted boxes (every area) whose stated depth ``d`` satisfies
  ``|m − d| ≤ 0.1·m`` with ``m`` the box's mean depth (below); invalid boxes are misses. Guard for ``m → 0``: the
  tolerance is ``max(0.1·m, 5e-4)``, half the last digit of the 3-decimal SIF writer, so a box on the nearest plane
  stated as ``0.0`` counts as right. No boxes or no depth map: 0.

**release** (``release_*`` functions; the text itself is read, not ``p``):

* **format**: the first ``<think>…</think>`` and the first ``<answer>…</answer>`` anywhere (unanchored); a
  non-empty answer; inside think (stripped) every ``<tag>``/``</tag>`` in groups ``<area></area><text></text>``,
  starting with ``<area>`` and ending with ``</text>``; each area's JSON a list (``[]`` passes) of objects with
  ``bbox_2d`` (a list of 4 numbers) and ``depth``, x2 > x1, y2 > y1, all in [0, 1], floats with ≤ 3 decimals as
  ``str()`` writes them (booleans count as numbers, as in Python); each text non-empty. Anything else scores 0.
* **areas** (grounding and depth): every ``<area>(.*?)</area>`` in the text, valid or not, with its raw
  ``bbox_2d`` and ``depth`` values; an unreadable payload (or an item the release fails on) contributes ``[]``.
* **answer** ``r_a = s + (s − s_prev)`` only when the prompt was seen before and ``s ≥ s_prev``, else ``s``;
  ``s_prev`` is the prompt's stored group mean of ``r_a`` itself (bonus included), and a mean of 0 is never stored.
  ``s`` is scored as in strict on the first ``<answer>…</answer>``'s stripped content.
* **grounding** ``end + max(0, end − start)`` with ``engine.rl.iou.release_box_set_iou`` (union IoU and matched
  IoU over ``min(|P|, |G|)``, raw corners); end = the last area (empty: 0), start = the first area not exactly
  ``[[0, 0, 1, 1]]``; an area holding anything but lists of 4 finite numbers cannot be scored: as end it gives 0,
  as start the end alone.
* **depth**: hits ÷ the number of ``depth`` entries; the k-th box of an area pairs with the k-th depth of that
  area; hit when ``|m − d| / m ≤ 0.1``; ``m = 0``, a box whose clamped pixel span is empty, or a non-numeric box
  or depth is a miss.

Shared by both: a box's mean depth ``m`` is the mean of the record's depth map over the pixels the box touches,
``engine.data.boxes.box_pixel_bounds`` (the trace writer's rule), measured by ``engine.ops.crop_boxes``'
``depth_stats`` with those integer bounds (one batched call per depth-map size). The total is ``Σ w_k r_k`` with all
weights 1 by default (the release sums unweighted).
"""

from __future__ import annotations

import concurrent.futures
import http.client
import json
import math
import re
import threading
import time
import urllib.error
import urllib.request
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch

from engine.data.answers import answers_match
from engine.data.boxes import box_pixel_bounds
from engine.data.sif_format import DepthBox, ParsedResponse, parse_response
from engine.ops import crop_boxes
from engine.rl.iou import box_set_iou, release_box_set_iou

REWARD_TERMS = ("format", "answer", "grounding", "depth")
REWARD_PROFILES = ("strict", "release")
DEPTH_REL_TOL = 0.1
DEPTH_ABS_TOL = 5e-4
FULL_IMAGE_TOL = 0.02

Judge = Callable[[str, str, str], float]
"""judge(question, prediction, reference) -> score in [0, 1]; used only for the answer types configured for it."""


@dataclass
class RewardWeights:
    """The ``rl.rewards`` section: per-term weights of the total reward (the release: all 1) and the profile.

    profile: ``strict`` (default: the engine's rules, the safer choice for a small model learning the format from
    scratch) or ``release`` (the released SIFThinker's reward code term by term). See docs/rewards.md.
    """

    format: float = 1.0
    answer: float = 1.0
    grounding: float = 1.0
    depth: float = 1.0
    profile: Literal["strict", "release"] = "strict"

    def __post_init__(self) -> None:
        if self.profile not in REWARD_PROFILES:
            raise ValueError(f"rl.rewards.profile must be one of {REWARD_PROFILES}, got {self.profile!r}")

    def as_dict(self) -> dict[str, float]:
        return {k: float(getattr(self, k)) for k in REWARD_TERMS}


@dataclass
class RewardTarget:
    """One record's ground truth, as the rewards need it.

    gt_boxes: normalised ``[x1, y1, x2, y2]`` rows. depth: float32 [H, W] scalar depth in [0, 1] (0 near) or None.
    options: letter -> option text for choice questions (lets an answer given as the option's text match).
    """

    record_id: str
    question: str
    answer: str
    answer_type: str
    gt_boxes: Sequence[Sequence[float]]
    depth: torch.Tensor | None = None
    options: Mapping[str, str] | None = None


def box_is_valid(box: DepthBox) -> bool:
    """Finite, inside the unit square with positive width and height, depth in [0, 1]."""
    vals = (box.x1, box.y1, box.x2, box.y2, box.depth)
    if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in vals):
        return False
    return 0.0 <= box.x1 < box.x2 <= 1.0 and 0.0 <= box.y1 < box.y2 <= 1.0 and 0.0 <= box.depth <= 1.0


def format_reward(parsed: ParsedResponse) -> float:
    """1.0 iff strictly well-formed, at least one area, every box valid and the answer non-empty; else 0.0."""
    if parsed.error is not None or not parsed.areas:
        return 0.0
    if parsed.answer is None or not parsed.answer.strip():
        return 0.0
    if any(not area or not all(box_is_valid(b) for b in area) for area in parsed.areas):
        return 0.0
    return 1.0


def answer_score(
    prediction: str | None, target: RewardTarget, judge: Judge | None = None, judge_types: Sequence[str] = ()
) -> float:
    """s ∈ [0, 1]: 0 for a missing/empty answer; the judge for ``judge_types``; else the rule by answer type."""
    if prediction is None or not prediction.strip():
        return 0.0
    if judge is not None and target.answer_type in judge_types:
        score = float(judge(target.question, prediction, target.answer))
        if not 0.0 <= score <= 1.0:
            raise ValueError(f"judge returned {score} for record {target.record_id!r}; expected a score in [0, 1]")
        return score
    options = dict(target.options) if target.options else None
    return float(answers_match(prediction, target.answer, target.answer_type, options=options))


class HTTPJudge:
    """The ``Judge`` of :func:`http_judge`: one POST per question, retried with exponential backoff.

    ``prefetch(items)`` scores many ``(question, prediction, reference)`` triples concurrently (at most
    ``max_concurrency`` requests in flight) and keeps the scores of that batch, so that the per-completion calls
    made by the reward code afterwards are answered from them; a triple not prefetched is fetched when called.
    """

    RETRY_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})

    def __init__(self, url: str, *, timeout_s: float, retries: int, backoff_s: float, max_concurrency: int) -> None:
        if retries < 0 or max_concurrency < 1:
            raise ValueError(f"judge {url}: retries must be >= 0 and max_concurrency >= 1")
        self.url, self.timeout_s, self.retries, self.backoff_s = url, timeout_s, retries, backoff_s
        self.max_concurrency = max_concurrency
        self._slots = threading.BoundedSemaphore(max_concurrency)
        self._scores: dict[tuple[str, str, str], float] = {}

    def __call__(self, question: str, prediction: str, reference: str) -> float:
        key = (question, prediction, reference)
        if key in self._scores:
            return self._scores[key]
        return self._fetch(key)

    def prefetch(self, items: Sequence[tuple[str, str, str]]) -> None:
        """Score the distinct ``items`` concurrently; the next calls for them return these scores."""
        unique = list(dict.fromkeys(items))
        if not unique:
            self._scores = {}
            return
        with concurrent.futures.ThreadPoolExecutor(max_workers=min(self.max_concurrency, len(unique))) as pool:
            self._scores = dict(zip(unique, pool.map(self._fetch, unique)))

    def _fetch(self, key: tuple[str, str, str]) -> float:
        question, prediction, reference = key
        body = json.dumps({"question": question, "prediction": prediction, "reference": reference}).encode()
        last: Exception | None = None
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff_s * 2 ** (attempt - 1))
            request = urllib.request.Request(self.url, data=body, headers={"Content-Type": "application/json"})
            try:
                with self._slots, urllib.request.urlopen(request, timeout=self.timeout_s) as reply:
                    raw = reply.read()
            except urllib.error.HTTPError as exc:
                if exc.code not in self.RETRY_STATUS:
                    raise RuntimeError(f"judge {self.url}: HTTP {exc.code} {exc.reason} (not retried)") from exc
                last = exc
                continue
            except (urllib.error.URLError, TimeoutError, ConnectionError, http.client.HTTPException) as exc:
                last = exc
                continue
            return self._score(raw)
        raise RuntimeError(
            f"judge {self.url}: no reply after {self.retries + 1} attempts (timeout {self.timeout_s:g} s, backoff "
            f"from {self.backoff_s:g} s): {type(last).__name__}: {last}"
        )

    def _score(self, raw: bytes) -> float:
        try:
            payload = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"judge {self.url}: reply is not JSON: {raw[:200]!r}") from exc
        score = payload.get("score") if isinstance(payload, dict) else None
        if not isinstance(score, (int, float)) or isinstance(score, bool):
            got = str(payload)[:200]
            raise ValueError(f"judge {self.url}: expected a JSON object with a numeric 'score', got {got}")
        return float(score)


def http_judge(
    url: str,
    timeout_s: float = 30.0,
    *,
    retries: int = 3,
    backoff_s: float = 1.0,
    max_concurrency: int = 8,
    answer_types: Sequence[str] | None = None,
) -> HTTPJudge:
    """A ``Judge`` that POSTs ``{"question", "prediction", "reference"}`` as JSON to ``url`` and reads ``{"score"}``.

    Opt-in only (``rl.judge_url``); the engine makes no network calls otherwise. The reply is parsed as JSON,
    never evaluated; a reply without a numeric ``score`` raises naming the endpoint. A failed call (connection
    error, timeout of ``timeout_s``, HTTP 408/425/429/5xx) is retried ``retries`` times after ``backoff_s``,
    2 x ``backoff_s``, ...; then it raises naming the URL and the last error (other HTTP errors are not retried).
    A batch's calls run concurrently, at most ``max_concurrency`` at a time (:meth:`HTTPJudge.prefetch`, which the
    GRPO source calls through :func:`prefetch_judge`). ``answer_types`` (the run's ``rl.judge_answer_types``):
    when given and empty, warns that the judge will never be asked.
    """
    if answer_types is not None and not answer_types:
        warnings.warn(
            f"rl.judge_url = {url!r} is set but rl.judge_answer_types is empty: the judge is never called and every "
            f"answer is scored by the rules; set e.g. --rl.judge_answer_types word",
            stacklevel=2,
        )
    return HTTPJudge(url, timeout_s=timeout_s, retries=retries, backoff_s=backoff_s, max_concurrency=max_concurrency)


def prefetch_judge(
    judge: Judge | None,
    texts: Sequence[str],
    prompt_index: Sequence[int],
    targets: Sequence[RewardTarget],
    judge_types: Sequence[str],
) -> None:
    """Let a judge with a ``prefetch`` method (:class:`HTTPJudge`) score, concurrently, every completion that
    :func:`answer_score` will send it (non-empty answer of a ``judge_types`` record); others are left alone."""
    if judge is None or not judge_types or not hasattr(judge, "prefetch"):
        return
    items = []
    for text, pi in zip(texts, prompt_index):
        target = targets[pi]
        answer = parse_response(text).answer
        if target.answer_type in judge_types and answer is not None and answer.strip():
            items.append((target.question, answer, target.answer))
    judge.prefetch(items)


def progress_reward(score: float, previous: float | None) -> float:
    """``s + max(0, s − s_prev)``; no progress term when there is no previous score."""
    if previous is None:
        return score
    return score + max(0.0, score - previous)


def _is_full_image(area: Sequence[DepthBox], tol: float = FULL_IMAGE_TOL) -> bool:
    """An area is "the full image" when one of its boxes spans [0, 1]² within ``tol`` on every side."""
    return any(b.x1 <= tol and b.y1 <= tol and b.x2 >= 1 - tol and b.y2 >= 1 - tol for b in area)


def _coords(area: Sequence[DepthBox]) -> list[list[float]]:
    return [[b.x1, b.y1, b.x2, b.y2] for b in area if box_is_valid(b)]


def grounding_reward(areas: Sequence[Sequence[DepthBox]], gt_boxes: Sequence[Sequence[float]]) -> float:
    """``IoU_end + max(0, IoU_end − IoU_start)``; invalid boxes are dropped before the IoU (they cover nothing)."""
    if not areas or len(gt_boxes) == 0:
        return 0.0
    iou_end = box_set_iou(_coords(areas[-1]), gt_boxes)
    start = next((a for a in areas if not _is_full_image(a)), None)
    if start is None:
        return iou_end
    iou_start = box_set_iou(_coords(start), gt_boxes)
    return iou_end + max(0.0, iou_end - iou_start)


def depth_reward(stated: Sequence[float], measured: Sequence[float]) -> float:
    """Fraction of boxes with ``|m − d| ≤ max(0.1·m, 5e-4)``; 0 when there are no boxes."""
    if len(stated) != len(measured):
        raise ValueError(f"depth_reward: {len(stated)} stated depths but {len(measured)} measured")
    if not stated:
        return 0.0
    hits = sum(abs(m - d) <= max(DEPTH_REL_TOL * m, DEPTH_ABS_TOL) for d, m in zip(stated, measured))
    return hits / len(stated)


def box_mean_depths(depth_maps: Sequence[torch.Tensor], boxes: Sequence[tuple[int, Sequence[float]]]) -> list[float]:
    """Mean depth inside each box: ``boxes[k] = (map index, normalised box [x1, y1, x2, y2, ...])`` -> ``[m_k]``.

    The pixels are ``box_pixel_bounds`` (float64), handed to ``crop_boxes`` as integer pixel boxes, so the reward
    reads exactly the pixels the trace writer's ``box_mean_depth`` reads. One call per distinct depth-map size
    (maps of equal size are stacked), reading only the ``depth_stats`` mean; crops are requested at 1x1.
    """
    out = [0.0] * len(boxes)
    by_shape: dict[tuple[int, int], list[int]] = {}
    for k, (m, _) in enumerate(boxes):
        by_shape.setdefault(tuple(depth_maps[m].shape[-2:]), []).append(k)
    for (h, w), ks in by_shape.items():
        maps = sorted({boxes[k][0] for k in ks})
        slot = {m: i for i, m in enumerate(maps)}
        depth = torch.stack([depth_maps[m].reshape(h, w).float() for m in maps])  # [N, H, W]
        bounds = [box_pixel_bounds(boxes[k][1], h, w) for k in ks]
        pix = torch.tensor([[c0, r0, c1, r1] for r0, r1, c0, c1 in bounds], dtype=torch.float32)
        index = torch.tensor([slot[boxes[k][0]] for k in ks], dtype=torch.int64)
        stats = crop_boxes(depth[:, None].expand(-1, 3, -1, -1), pix, index, (1, 1), depth=depth).depth_stats
        for k, mean in zip(ks, stats[:, 1].tolist()):
            out[k] = mean
    return out


class AnswerProgress:
    """``s_prev`` for the answer progress term: each record's group mean when last seen (strict: of the answer score
    ``s``; release: of the answer reward ``r_a``, bonus included, and only when that mean is not 0).

    Plain ``dict[str, float]`` state, so it checkpoints as ``state_dict()`` / ``load_state_dict()``; ``merge``
    folds in another rank's entries (records are disjoint across ranks within a step).
    """

    def __init__(self) -> None:
        self._last: dict[str, float] = {}

    def get(self, record_id: str) -> float | None:
        return self._last.get(record_id)

    def update(self, record_id: str, group_mean: float) -> None:
        self._last[record_id] = float(group_mean)

    def __len__(self) -> int:
        return len(self._last)

    def state_dict(self) -> dict[str, float]:
        return dict(self._last)

    def load_state_dict(self, state: Mapping[str, float]) -> None:
        self._last = {str(k): float(v) for k, v in state.items()}

    def merge(self, state: Mapping[str, float]) -> None:
        self._last.update({str(k): float(v) for k, v in state.items()})


@dataclass
class RewardBatch:
    """Rewards of N completions: ``terms[k]`` float32 [N] per term, ``total`` float32 [N], plus the parses."""

    terms: dict[str, torch.Tensor]
    total: torch.Tensor
    parsed: list[ParsedResponse]
    answer_scores: torch.Tensor

    def per_sample(self) -> dict[str, torch.Tensor]:
        """``reward/<term>``, ``reward/total`` and ``reward/accuracy`` (the answer score s, no progress), each [N]."""
        out = {f"reward/{k}": v for k, v in self.terms.items()}
        out["reward/total"] = self.total
        out["reward/accuracy"] = self.answer_scores
        return out

    def metrics(self) -> dict[str, float]:
        """Batch means of ``per_sample()``."""
        return {k: float(v.float().mean()) for k, v in self.per_sample().items()}


def score_completions(
    texts: Sequence[str],
    prompt_index: Sequence[int],
    targets: Sequence[RewardTarget],
    *,
    weights: RewardWeights | None = None,
    progress: AnswerProgress | None = None,
    judge: Judge | None = None,
    judge_types: Sequence[str] = (),
) -> RewardBatch:
    """Score completions ``texts[i]`` of prompt ``targets[prompt_index[i]]`` under ``weights.profile``; updates
    ``progress`` per prompt.

    ``s_prev`` is read for every prompt before any update, then each prompt's group mean is stored (strict: of
    ``s``; release: of ``r_a``, unless it is 0).
    """
    cfg = weights or RewardWeights()
    if len(texts) != len(prompt_index):
        raise ValueError(f"score_completions: {len(texts)} texts but {len(prompt_index)} prompt indices")
    for i, p in enumerate(prompt_index):
        if not 0 <= p < len(targets):
            raise IndexError(f"score_completions: completion {i} has prompt_index {p}, only {len(targets)} targets")
    release = cfg.profile == "release"
    parsed = [parse_response(t) for t in texts]
    if release:
        fmt = [release_format_reward(t) for t in texts]
        answers = [release_answer(t) for t in texts]
    else:
        fmt = [format_reward(p) for p in parsed]
        answers = [p.answer for p in parsed]
    scores = [answer_score(a, targets[pi], judge, judge_types) for a, pi in zip(answers, prompt_index)]

    previous = {pi: progress.get(targets[pi].record_id) if progress is not None else None for pi in set(prompt_index)}
    bonus = release_progress_reward if release else progress_reward
    ans = [bonus(s, previous[pi]) for s, pi in zip(scores, prompt_index)]
    if progress is not None:
        stored = ans if release else scores
        for pi in previous:
            group = [v for v, q in zip(stored, prompt_index) if q == pi]
            mean = sum(group) / len(group)
            if not (release and mean == 0):
                progress.update(targets[pi].record_id, mean)

    depth_maps = [t.depth for t in targets]
    if release:
        areas = [release_areas(t) for t in texts]
        grd = [
            release_grounding_reward([a.boxes for a in ar], targets[pi].gt_boxes) for ar, pi in zip(areas, prompt_index)
        ]
        dep = _release_depth_terms(areas, prompt_index, depth_maps)
    else:
        grd = [grounding_reward(p.areas, targets[pi].gt_boxes) for p, pi in zip(parsed, prompt_index)]
        dep = _depth_terms(parsed, prompt_index, depth_maps)

    terms = {k: torch.tensor(v, dtype=torch.float32) for k, v in zip(REWARD_TERMS, (fmt, ans, grd, dep), strict=True)}
    w = cfg.as_dict()
    total = sum(w[k] * terms[k] for k in REWARD_TERMS)
    return RewardBatch(terms=terms, total=total, parsed=parsed, answer_scores=torch.tensor(scores))


def _depth_terms(
    parsed: Sequence[ParsedResponse], prompt_index: Sequence[int], depth_maps: Sequence[torch.Tensor | None]
) -> list[float]:
    """Depth reward per completion over all its boxes, measured in one batched pass; invalid boxes are misses."""
    queries: list[tuple[int, DepthBox]] = []
    owner: list[int] = []
    num_boxes = [0] * len(parsed)
    for i, (p, pi) in enumerate(zip(parsed, prompt_index)):
        if depth_maps[pi] is None:
            continue
        for box in (b for area in p.areas for b in area):
            num_boxes[i] += 1
            if box_is_valid(box):
                queries.append((pi, box))
                owner.append(i)
    measured = box_mean_depths(depth_maps, queries) if queries else []
    stated: list[list[float]] = [[] for _ in parsed]
    means: list[list[float]] = [[] for _ in parsed]
    for i, (_, box), m in zip(owner, queries, measured):
        stated[i].append(box.depth)
        means[i].append(m)
    return [depth_reward(stated[i], means[i]) * len(stated[i]) / n if n else 0.0 for i, n in enumerate(num_boxes)]


# ------------------------------------------------------------------------------------------ the release profile
# The released SIFThinker's rules, restated (docs/rewards.md lists them beside strict's). Every check is written
# out as the condition under which the release's code runs through without raising, since it scores 0 (format),
# skips a box (depth) or drops a term (grounding) on any exception.

_REL_THINK = re.compile(r"<think>(.*?)</think>", re.DOTALL)
_REL_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_REL_TAG = re.compile(r"<(/?\w+)>")
_REL_PAIR = re.compile(r"<area>(.*?)</area>\s*<text>(.*?)</text>", re.DOTALL)
_REL_AREA = re.compile(r"<area>(.*?)</area>", re.DOTALL)
_REL_GROUP = ["area", "/area", "text", "/text"]
_REL_FULL_IMAGE = [[0, 0, 1, 1]]
RELEASE_DEPTH_REL_TOL = 0.1


def _is_release_number(v: object) -> bool:
    """``isinstance(v, (int, float))``: what the release accepts as a number (so JSON true/false count, as 1/0)."""
    return isinstance(v, (int, float))


def _release_float(v: object) -> float | None:
    """``float(v)`` for a finite number, else None (non-numbers, NaN, ±inf, ints too large for a float)."""
    if not _is_release_number(v):
        return None
    try:
        f = float(v)
    except OverflowError:
        return None
    return f if math.isfinite(f) else None


def _release_box_is_valid(item: object) -> bool:
    """One area item passes the release's format check: an object with ``bbox_2d`` (a list of 4 numbers) and
    ``depth``, all numbers in [0, 1], x2 > x1, y2 > y1, floats with at most 3 digits after ``str()``'s point."""
    if not isinstance(item, dict) or "bbox_2d" not in item or "depth" not in item:
        return False
    bbox, depth = item["bbox_2d"], item["depth"]
    if not isinstance(bbox, list) or len(bbox) != 4:
        return False
    values = [*bbox, depth]
    if not all(_is_release_number(v) and 0 <= v <= 1 for v in values):  # NaN fails the range
        return False
    if not (bbox[2] > bbox[0] and bbox[3] > bbox[1]):
        return False
    for v in values:
        if isinstance(v, float):
            digits = str(v).partition(".")[2]
            if "." not in str(v) or len(digits) > 3:  # '1e-05' has no point: the release fails on it too
                return False
    return True


def release_format_reward(text: str) -> float:
    """1.0 iff ``text`` passes the released format check (module docstring, **release**), else 0.0."""
    think, answer = _REL_THINK.search(text), _REL_ANSWER.search(text)
    if think is None or answer is None or not answer.group(1).strip():
        return 0.0
    body = think.group(1).strip()
    tags = _REL_TAG.findall(body)
    if len(tags) % 4 or any(tags[i : i + 4] != _REL_GROUP for i in range(0, len(tags), 4)):
        return 0.0
    if not body.startswith("<area>") or not body.endswith("</text>"):
        return 0.0
    pairs = _REL_PAIR.findall(body)
    if not pairs:
        return 0.0
    for payload, note in pairs:
        try:
            items = json.loads(payload.strip())
        except (ValueError, RecursionError):
            return 0.0
        if not isinstance(items, list) or not all(_release_box_is_valid(item) for item in items):
            return 0.0
        if not note.strip():
            return 0.0
    return 1.0


def release_answer(text: str) -> str | None:
    """The stripped content of the first ``<answer>…</answer>`` anywhere in ``text``, or None."""
    match = _REL_ANSWER.search(text)
    return match.group(1).strip() if match else None


class ReleaseArea(NamedTuple):
    """One ``<area>`` as the release reads it: the raw ``bbox_2d`` values and, separately, the raw ``depth`` values
    of its items (``[]`` where the release's reader fails: an unreadable payload, or an item it cannot index)."""

    boxes: list[object]
    depths: list[object]


def _release_field(payload: str, key: str) -> list[object]:
    """Raw ``key`` values of an area payload, read as the release reads it (module docstring)."""
    try:
        data = json.loads(payload)
    except (ValueError, RecursionError):
        return [[]]
    out: list[object] = []
    for item in data if isinstance(data, list) else [data]:
        if isinstance(item, dict):
            if key in item:
                out.append(item[key])
            continue
        # A string holding ``key`` (substring) or a list holding it (element) passes the release's ``key in item``
        # and then fails on ``item[key]``; a number, boolean or null fails the ``in`` itself. Reading stops there.
        if not isinstance(item, (str, list)) or key in item:
            out.append([])
            break
    return out


def release_areas(text: str) -> list[ReleaseArea]:
    """Every ``<area>(.*?)</area>`` of ``text`` in order (inside think or not, valid or not)."""
    return [ReleaseArea(_release_field(p, "bbox_2d"), _release_field(p, "depth")) for p in _REL_AREA.findall(text)]


def _release_iou(area: Sequence[object], gt_boxes: Sequence[Sequence[float]]) -> float | None:
    """``release_box_set_iou`` of an area's raw boxes, or None when a box is not a list of 4 finite numbers."""
    boxes = []
    for box in area:
        if not isinstance(box, list) or len(box) != 4:
            return None
        coords = [_release_float(v) for v in box]
        if any(c is None for c in coords):
            return None
        boxes.append(coords)
    return release_box_set_iou(boxes, [[float(v) for v in b] for b in gt_boxes])


def release_grounding_reward(areas: Sequence[Sequence[object]], gt_boxes: Sequence[Sequence[float]]) -> float:
    """``end + max(0, end − start)`` over the raw boxes of every area (``ReleaseArea.boxes``).

    end = the last area (none, empty or unscorable: 0); start = the first area not exactly ``[[0, 0, 1, 1]]``
    (if none, ``[[0, 0, 1, 1]]`` itself); an unscorable start leaves the end alone.
    """
    if not areas or not areas[-1]:
        return 0.0
    end = _release_iou(areas[-1], gt_boxes)
    if end is None:
        return 0.0
    start_area = next((a for a in areas if a != _REL_FULL_IMAGE), _REL_FULL_IMAGE)
    start = _release_iou(start_area, gt_boxes)
    if start is None:
        return end
    return end + max(0.0, end - start)


def release_progress_reward(score: float, previous: float | None) -> float:
    """``s + (s − s_prev)`` when the prompt was seen before and ``s ≥ s_prev``; else ``s``."""
    if previous is None or score < previous:
        return score
    return score + (score - previous)


def _release_depth_box(box: object, height: int, width: int) -> bool:
    """The release can measure ``box``: a list of 4 numbers whose clamped pixel span is not empty."""
    if not isinstance(box, list) or len(box) != 4 or not all(_is_release_number(v) for v in box):
        return False
    try:
        c0 = min(max(math.floor(box[0] * width), 0), width - 1)
        r0 = min(max(math.floor(box[1] * height), 0), height - 1)
        c1 = min(max(math.ceil(box[2] * width), 0), width)
        r1 = min(max(math.ceil(box[3] * height), 0), height)
    except (OverflowError, ValueError):  # ±inf or NaN
        return False
    return c1 > c0 and r1 > r0


def release_depth_hit(stated: object, measured: float) -> bool:
    """``|m − d| / m ≤ 0.1``; ``m = 0`` and a non-numeric or non-finite ``d`` are misses."""
    d = _release_float(stated)
    if d is None or measured == 0:
        return False
    return abs(measured - d) / measured <= RELEASE_DEPTH_REL_TOL


def _release_depth_terms(
    areas: Sequence[Sequence[ReleaseArea]], prompt_index: Sequence[int], depth_maps: Sequence[torch.Tensor | None]
) -> list[float]:
    """Release depth reward per completion: hits ÷ the number of depth entries, all boxes measured in one pass."""
    queries: list[tuple[int, Sequence[float]]] = []  # raw boxes: box_pixel_bounds takes ints (even huge) and floats
    pending: list[tuple[int, object]] = []  # (completion, stated depth) per query
    totals = [0] * len(areas)
    for i, (completion, pi) in enumerate(zip(areas, prompt_index)):
        depth = depth_maps[pi]
        if depth is None:
            continue
        h, w = depth.shape[-2:]
        totals[i] = sum(len(a.depths) for a in completion)
        for area in completion:
            for box, stated in zip(area.boxes, area.depths):  # the k-th box with the k-th depth, as released
                if _release_depth_box(box, h, w):
                    queries.append((pi, box))
                    pending.append((i, stated))
    measured = box_mean_depths(depth_maps, queries) if queries else []
    hits = [0] * len(areas)
    for (i, stated), m in zip(pending, measured):
        hits[i] += release_depth_hit(stated, m)
    return [hits[i] / totals[i] if totals[i] else 0.0 for i in range(len(areas))]
