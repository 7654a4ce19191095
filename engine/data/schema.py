"""The record schema, its JSONL form, and a validating loader that skips (and counts) bad records.

One JSON object per line::

    {"id": "synth-000001", "image": "images/000001.png", "depth": "depth/000001.png",
     "depth_image": "depth_color/000001.png", "question": "...", "answer": "B", "answer_type": "choice",
     "options": {"A": "...", "B": "..."}, "gt_boxes": [[x1, y1, x2, y2]], "width": 224, "height": 224,
     "qtype": "nearer_farther", "trace": [{"boxes": [{"bbox_2d": [...], "depth": d}], "text": "..."}], "meta": {}}

Required: ``id``, ``image``, ``question``, ``answer``, ``answer_type``, ``gt_boxes`` (possibly empty). Paths are
relative to the JSONL file's folder unless absolute. Boxes are normalised [0, 1] (x2 > x1, y2 > y1); trace depths
are in [0, 1] with 0 = nearest. ``width``/``height`` are read from the image header when absent. A trace step may
also be written ``{"text": ..., "box": [x1, y1, x2, y2], "depth": d}``.

``load_records`` never stops on a bad record: it names it ``file:line``, skips it, and counts the reason in a
:class:`SkipReport`. The loader reads image headers only; a file whose body is corrupt (or a depth map a prompt
needs but the record lacks) is found where the record is first decoded: :class:`DecodedRecords` skips it there,
counts it in the same report, names it ``file:line``, and uses the next decodable record instead. A run stops
(:class:`SkipLimitError`, with the list) only when the skipped share of the file's records passes
``max_skip_share`` (``data.max_skip_share``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from engine.data.answers import ANSWER_TYPES, choice_letter, parse_box, parse_number
from engine.data.boxes import Box, box_problem
from engine.data.sif_format import DepthBox, format_response

logger = logging.getLogger(__name__)

FILE_CHECKS = ("header", "exists", "none")


@dataclass(frozen=True)
class TraceStep:
    """One focusing step: the area's boxes (normalised, with mean depth), the text written after it, and for
    built traces the step's kind (``full``, ``distractor``, ``union``, ``expanded``, ``target``)."""

    boxes: tuple[DepthBox, ...]
    text: str
    kind: str | None = None


@dataclass(frozen=True)
class Record:
    """One training/eval example. Paths are absolute once loaded."""

    id: str
    image: Path
    question: str
    answer: str
    answer_type: str
    gt_boxes: tuple[Box, ...]
    width: int
    height: int
    depth: Path | None = None
    depth_image: Path | None = None
    trace: tuple[TraceStep, ...] | None = None
    qtype: str = ""
    options: dict[str, str] | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    origin: str = field(default="", compare=False, repr=False)  # ``file:line`` it was loaded from (not written)

    def response(self) -> str:
        """The canonical SIF response (trace + answer) for SFT targets. Raises ValueError without a trace."""
        if not self.trace:
            raise ValueError(f"record {self.id}: has no trace")
        return format_response([list(s.boxes) for s in self.trace], [s.text for s in self.trace], self.answer)

    def load_depth_map(self) -> torch.Tensor | None:
        """Scalar depth float32 [H, W] in [0, 1] (0 = near) from ``depth``, else inverted from ``depth_image``."""
        from engine.data.images import load_depth

        path = self.depth or self.depth_image
        return None if path is None else load_depth(path)

    def to_json(self, base_dir: str | os.PathLike | None = None) -> dict[str, Any]:
        """JSON-ready dict; paths are made relative to ``base_dir`` when given."""

        def rel(p: Path | None) -> str | None:
            if p is None:
                return None
            return Path(os.path.relpath(p, base_dir)).as_posix() if base_dir is not None else str(p)

        out: dict[str, Any] = {
            "id": self.id,
            "image": rel(self.image),
            "depth": rel(self.depth),
            "depth_image": rel(self.depth_image),
            "question": self.question,
            "answer": self.answer,
            "answer_type": self.answer_type,
            "options": self.options,
            "gt_boxes": [list(b) for b in self.gt_boxes],
            "width": self.width,
            "height": self.height,
            "qtype": self.qtype,
            "trace": None if self.trace is None else [trace_step_json(s) for s in self.trace],
            "meta": self.meta,
        }
        return {k: v for k, v in out.items() if v is not None}


def trace_step_json(step: TraceStep) -> dict[str, Any]:
    """JSON form of a trace step (``kind`` only when known)."""
    out: dict[str, Any] = {"boxes": [{"bbox_2d": list(b[:4]), "depth": b.depth} for b in step.boxes], "text": step.text}
    if step.kind is not None:
        out["kind"] = step.kind
    return out


class SkipLimitError(RuntimeError):
    """Too large a share of the records was skipped; the message lists them."""


class RecordError(ValueError):
    """A record failed validation; ``category`` is the short reason counted in the SkipReport."""

    def __init__(self, category: str, message: str):
        super().__init__(f"{category}: {message}")
        self.category = category


@dataclass
class SkipReport:
    """What a load kept and skipped: ``skipped`` holds ``(where, reason)`` with where = ``file:line``."""

    source: str
    total: int = 0
    loaded: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)
    by_reason: Counter = field(default_factory=Counter)
    notes: Counter = field(default_factory=Counter)

    def add_skip(self, where: str, err: RecordError) -> None:
        self.skipped.append((where, str(err)))
        self.by_reason[err.category] += 1

    @property
    def num_skipped(self) -> int:
        return len(self.skipped)

    @property
    def share(self) -> float:
        """Skipped records (at load and at decode) over the records of the file."""
        return self.num_skipped / self.total if self.total else 0.0

    def check_share(self, max_share: float) -> None:
        """Raise :class:`SkipLimitError` with the list when the skipped share passes ``max_share``."""
        if self.num_skipped and self.share > max_share:
            raise SkipLimitError(
                f"{self.num_skipped} of {self.total} records skipped ({self.share:.1%}), more than "
                f"data.max_skip_share = {max_share:g}; fix the data or raise the limit:\n"
                + self.summary(max_examples=50)
            )

    def summary(self, max_examples: int = 5) -> str:
        """One paragraph: counts by reason and the first few offending records."""
        lines = [f"{self.source}: loaded {self.loaded} of {self.total} records, skipped {self.num_skipped}"]
        lines += [f"  {n} x {reason}" for reason, n in self.by_reason.most_common()]
        lines += [f"  note: {n} x {what}" for what, n in self.notes.most_common()]
        lines += [f"  e.g. {where}: {reason}" for where, reason in self.skipped[:max_examples]]
        return "\n".join(lines)


def _require(obj: dict, key: str, kind: type | tuple[type, ...]) -> Any:
    if key not in obj or obj[key] is None:
        raise RecordError("missing field", f"'{key}'")
    value = obj[key]
    if not isinstance(value, kind) or isinstance(value, bool):
        names = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
        raise RecordError("bad value", f"'{key}' must be {names}, got {type(value).__name__}")
    return value


def _resolve(path_str: str, base: Path) -> Path:
    p = Path(path_str)
    return p if p.is_absolute() else base / p


def _file_size(path: Path, what: str) -> tuple[int, int]:
    """(width, height) from an image header or a ``.npy`` header; the file must exist and parse."""
    if not path.is_file():
        raise RecordError("unreadable file", f"{what} {path} does not exist")
    try:
        if path.suffix.lower() == ".npy":
            shape = np.load(path, mmap_mode="r", allow_pickle=False).shape
            return (shape[1], shape[0]) if len(shape) >= 2 else (0, 0)
        with Image.open(path) as img:
            return img.size
    except Image.DecompressionBombError as exc:
        raise RecordError("image too large", f"{what} {path}: {exc}") from exc
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise RecordError("unreadable file", f"{what} {path}: {exc}") from exc


def _parse_boxes(raw: Any, key: str) -> tuple[Box, ...]:
    if not isinstance(raw, list):
        raise RecordError("bad value", f"'{key}' must be a list of [x1, y1, x2, y2]")
    boxes = []
    for j, b in enumerate(raw):
        if not isinstance(b, list):
            raise RecordError("bad value", f"{key}[{j}] must be a list of 4 numbers")
        problem = box_problem(b)
        if problem:
            category = "box outside image" if "outside" in problem else "bad box"
            raise RecordError(category, f"{key}[{j}] {problem}")
        boxes.append(tuple(float(v) for v in b))
    return tuple(boxes)


def _parse_trace(raw: Any) -> tuple[TraceStep, ...]:
    if not isinstance(raw, list) or not raw:
        raise RecordError("bad trace", "'trace' must be a non-empty list of steps")
    steps = []
    for i, step in enumerate(raw):
        if not isinstance(step, dict):
            raise RecordError("bad trace", f"trace[{i}] must be an object")
        text = step.get("text")
        if not isinstance(text, str) or not text.strip():
            raise RecordError("bad trace", f"trace[{i}].text must be a non-empty string")
        if "boxes" in step:
            items = step["boxes"]
            if not isinstance(items, list) or not items or not all(isinstance(it, dict) for it in items):
                raise RecordError("bad trace", f"trace[{i}].boxes must be a non-empty list of objects")
            pairs = [(it.get("bbox_2d"), it.get("depth")) for it in items]
        else:
            pairs = [(step.get("box"), step.get("depth"))]
        boxes = []
        for j, (bbox, depth) in enumerate(pairs):
            if not isinstance(bbox, list):
                raise RecordError("bad trace", f"trace[{i}].boxes[{j}] needs a bbox_2d list")
            (box,) = _parse_boxes([bbox], f"trace[{i}].boxes[{j}]")
            if not isinstance(depth, (int, float)) or isinstance(depth, bool) or not 0.0 <= depth <= 1.0:
                raise RecordError("bad trace", f"trace[{i}].boxes[{j}].depth must be a number in [0, 1]")
            boxes.append(DepthBox(*box, float(depth)))
        kind = step.get("kind")
        if kind is not None and not isinstance(kind, str):
            raise RecordError("bad trace", f"trace[{i}].kind must be a string")
        steps.append(TraceStep(tuple(boxes), text, kind))
    return tuple(steps)


def _check_answer(answer: str, answer_type: str) -> None:
    if answer_type not in ANSWER_TYPES:
        raise RecordError("bad value", f"answer_type {answer_type!r} not one of {ANSWER_TYPES}")
    ok = {
        "choice": lambda: choice_letter(answer) is not None,
        "number": lambda: parse_number(answer) is not None,
        "box": lambda: parse_box(answer) is not None,
        "word": lambda: bool(answer.strip()),
    }[answer_type]()
    if not ok:
        raise RecordError("bad value", f"answer {answer!r} is not a valid {answer_type} answer")


def record_from_json(obj: Any, base_dir: Path, check_files: str = "header") -> Record:
    """Validate one JSON object and build a Record; raises RecordError naming the field at fault."""
    if not isinstance(obj, dict):
        raise RecordError("bad value", f"a record must be a JSON object, got {type(obj).__name__}")
    rid = _require(obj, "id", (str, int))
    image = _resolve(_require(obj, "image", str), base_dir)
    question = _require(obj, "question", str)
    if not question.strip():
        raise RecordError("bad value", "'question' is empty")
    answer = str(_require(obj, "answer", (str, int, float)))
    answer_type = _require(obj, "answer_type", str)
    _check_answer(answer, answer_type)
    gt_boxes = _parse_boxes(_require(obj, "gt_boxes", list), "gt_boxes")
    width, height = obj.get("width"), obj.get("height")
    size = None
    if check_files == "header" or width is None or height is None:
        size = _file_size(image, "image")
    elif check_files == "exists" and not image.is_file():
        raise RecordError("unreadable file", f"image {image} does not exist")
    if width is None or height is None:
        width, height = size
    if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in (width, height)):
        raise RecordError("bad value", f"width/height must be positive integers, got {width}/{height}")
    if size is not None and tuple(size) != (width, height):
        raise RecordError("bad value", f"width/height {width}x{height} but image {image} is {size[0]}x{size[1]}")
    paths = {}
    for key in ("depth", "depth_image"):
        if obj.get(key) is None:
            continue
        paths[key] = _resolve(_require(obj, key, str), base_dir)
        if check_files == "header":
            dsize = _file_size(paths[key], key)
            if dsize != (width, height):
                raise RecordError("bad value", f"{key} {paths[key]} is {dsize[0]}x{dsize[1]}, not {width}x{height}")
        elif check_files == "exists" and not paths[key].is_file():
            raise RecordError("unreadable file", f"{key} {paths[key]} does not exist")
    options = obj.get("options")
    if options is not None and not (
        isinstance(options, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in options.items())
    ):
        raise RecordError("bad value", "'options' must map letters to strings")
    meta = obj.get("meta", {})
    if not isinstance(meta, dict):
        raise RecordError("bad value", "'meta' must be an object")
    qtype = obj.get("qtype", "")
    if not isinstance(qtype, str):
        raise RecordError("bad value", "'qtype' must be a string")
    trace = _parse_trace(obj["trace"]) if obj.get("trace") is not None else None
    return Record(
        id=str(rid),
        image=image,
        question=question,
        answer=answer,
        answer_type=answer_type,
        gt_boxes=gt_boxes,
        width=width,
        height=height,
        depth=paths.get("depth"),
        depth_image=paths.get("depth_image"),
        trace=trace,
        qtype=qtype,
        options=options,
        meta=meta,
    )


def load_records(path: str | os.PathLike, check_files: str = "header") -> tuple[list[Record], SkipReport]:
    """Load a JSONL file of records (or a SIF-50K ``.json`` list, via :func:`engine.data.sif50k.load_sif50k`).

    ``check_files``: ``header`` (files exist and image headers parse; the default), ``exists``, or ``none``.
    Bad records are skipped and counted; the summary is logged as a warning when any were skipped.
    """
    if check_files not in FILE_CHECKS:
        raise ValueError(f"check_files must be one of {FILE_CHECKS}, got {check_files!r}")
    path = Path(path)
    if path.suffix.lower() == ".json":
        from engine.data.sif50k import load_sif50k

        return load_sif50k(path, check_files=check_files)
    if not path.is_file():
        raise FileNotFoundError(f"record file not found: {path}")
    report = SkipReport(source=str(path))
    records: list[Record] = []
    seen: dict[str, int] = {}
    base = path.parent.resolve()
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            report.total += 1
            where = f"{path}:{lineno}"
            try:
                try:
                    obj = json.loads(line)
                except (ValueError, RecursionError) as exc:
                    raise RecordError("invalid JSON", str(exc)[:200]) from exc
                record = dataclasses.replace(record_from_json(obj, base, check_files), origin=where)
                if record.id in seen:
                    raise RecordError("duplicate id", f"{record.id!r} already on line {seen[record.id]}")
            except RecordError as err:
                report.add_skip(where, err)
                continue
            seen[record.id] = lineno
            records.append(record)
    report.loaded = len(records)
    if report.num_skipped:
        logger.warning("%s", report.summary())
    return records, report


def write_records(path: str | os.PathLike, records: list[Record]) -> None:
    """Write records as JSONL with paths relative to the file's folder."""
    path = Path(path)
    base = path.parent.resolve()
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r.to_json(base), separators=(",", ":"), ensure_ascii=False) + "\n")


class RecordList(list):
    """A list of records that keeps the :class:`SkipReport` of the load it came from (``.report``)."""

    def __init__(self, records: Sequence[Record] = (), report: SkipReport | None = None) -> None:
        super().__init__(records)
        self.report = report


T = TypeVar("T")


class DecodedRecords(Sequence[T], Generic[T]):
    """``records`` decoded on access by ``decode(record)``, skipping records whose media cannot be decoded.

    A :class:`~engine.data.images.MediaError` from ``decode`` (a truncated or garbled image, a missing depth file,
    an image past the decompression-bomb limit, a depth map the prompt needs but the record lacks) is warned about
    once, naming the record's ``file:line`` and the file; it is counted in ``report`` (the loader's, so load-time
    and decode-time skips are one count; default: ``records.report`` of a :class:`RecordList`) and remembered.
    Item ``i`` is then the first decodable record at or after ``i`` (cyclically): a step still gets full
    micro-batches and the choice depends only on which files are bad, so a resume replays it. ``sync_skips``
    (IndexedBatchSource calls it after every step, on every rank) shares the skips found on every rank; a
    :class:`SkipLimitError` listing them stops the run once the skipped share passes ``max_share``.
    """

    def __init__(
        self,
        records: Sequence[Record],
        decode: Callable[[Record], T],
        *,
        report: SkipReport | None = None,
        max_share: float = 0.1,
    ) -> None:
        report = report if report is not None else getattr(records, "report", None)
        self.records = list(records)
        self.decode = decode
        self.report = report if report is not None else SkipReport("records", len(self.records), len(self.records))
        self.max_share = max_share
        self.bad: dict[int, str] = {}
        self._unshared: list[tuple[int, str, str]] = []

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> T:  # type: ignore[override]
        n = len(self.records)
        for k in range(n):
            item = self.try_decode((index + k) % n)
            if item is not None:
                return item
        raise SkipLimitError(f"no record can be decoded:\n{self.report.summary(max_examples=50)}")

    def try_decode(self, index: int) -> T | None:
        """The decoded record ``index``, or None (counted and warned about once) when its media is bad."""
        if index in self.bad:
            return None
        from engine.data.images import MediaError

        record = self.records[index]
        try:
            return self.decode(record)
        except MediaError as exc:
            where = record.origin or f"record {record.id!r}"
            self._add(index, where, str(exc))
            self._unshared.append((index, where, str(exc)))
            warnings.warn(
                f"{where}: skipped record {record.id!r}: {exc} ({self.report.num_skipped} of {self.report.total} "
                f"records skipped so far, limit {self.max_share:.0%})",
                stacklevel=2,
            )
            self.report.check_share(self.max_share)
            return None

    def _add(self, index: int, where: str, message: str) -> None:
        self.bad[index] = message
        self.report.add_skip(where, RecordError("unreadable media", message))

    def sync_skips(self, device: Any = None) -> int:
        """Share the skips found since the last call with every rank (collective when distributed); check the
        share limit; return the number of records skipped so far (load + decode)."""
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            count = torch.tensor([len(self._unshared)], dtype=torch.int64, device=device)
            dist.all_reduce(count, op=dist.ReduceOp.MAX)
            if count.item() > 0:
                gathered: list[Any] = [None] * dist.get_world_size()
                dist.all_gather_object(gathered, self._unshared)
                for entries in gathered:
                    for index, where, message in entries or ():
                        if index not in self.bad:
                            self._add(index, where, message)
        self._unshared = []
        self.report.check_share(self.max_share)
        return self.report.num_skipped
