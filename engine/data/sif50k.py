"""Reader for SIF-50K-style JSON (the SIFThinker release) into :class:`engine.data.schema.Record`.

A release item::

    {"dataset": "gqa", "image": "...jpg", "depth_image": "..._d.png", "problem": "<question>",
     "normalized_solution_round": {"bbox_3d": [[x1, y1, x2, y2], ...], "illegal_content": false},
     "response": "<gt answer>", "messages": [{"role": "user", ...}, {"role": "assistant", "content": "<think>..."}],
     "images": ["...jpg", "..._d.png"]}

Mapping: ``problem`` → question (a trailing SIF instruction is removed), ``response`` → answer, ``bbox_3d`` →
gt_boxes (normalised; boxes with a coordinate > 1 are taken as pixels and divided by the image size),
``depth_image`` → depth_image (Spectral_r PNG; :func:`engine.data.images.load_depth` inverts it), ``dataset`` →
qtype, the assistant message → trace when it parses as a well-formed SIF response (otherwise the record is kept
without a trace and the drop is counted in the report's notes). ``answer_type`` is inferred: a lone option letter
→ choice, a lone number → number, else word. Items flagged ``illegal_content: true`` are skipped.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path
from typing import Any

from engine.data.schema import Record, RecordError, SkipReport, record_from_json
from engine.data.sif_format import parse_response, strip_instruction

_LONE_LETTER = re.compile(r"^\(?[A-Z]\)?\.?$")
_LONE_NUMBER = re.compile(r"^[-+]?\d+(?:\.\d+)?$")


def infer_answer_type(answer: str) -> str:
    """``choice`` for a lone option letter, ``number`` for a lone number, else ``word``."""
    a = answer.strip()
    if _LONE_LETTER.match(a):
        return "choice"
    if _LONE_NUMBER.match(a):
        return "number"
    return "word"


def _image_size(path: Path) -> tuple[int, int]:
    from PIL import Image

    try:
        with Image.open(path) as img:
            return img.size
    except Image.DecompressionBombError as exc:
        raise ValueError(str(exc)) from exc


def _item_to_json(item: Any, index: int, base: Path, stem: str, report: SkipReport) -> dict[str, Any]:
    if not isinstance(item, dict):
        raise RecordError("bad value", f"item must be an object, got {type(item).__name__}")
    meta = item.get("normalized_solution_round")
    if not isinstance(meta, dict) or "bbox_3d" not in meta:
        raise RecordError("missing field", "'normalized_solution_round.bbox_3d'")
    if meta.get("illegal_content") is True:
        raise RecordError("flagged", "illegal_content is true")
    for key in ("image", "problem", "response"):
        if not isinstance(item.get(key), str):
            raise RecordError("missing field", f"'{key}'")
    boxes = meta["bbox_3d"]
    if isinstance(boxes, list) and boxes and all(isinstance(v, (int, float)) for v in boxes):
        boxes = [boxes]  # a single box written flat
    if not isinstance(boxes, list) or not all(isinstance(b, list) and len(b) == 4 for b in boxes):
        raise RecordError("bad box", f"bbox_3d must be a list of [x1, y1, x2, y2], got {str(boxes)[:80]}")
    image = Path(item["image"]) if Path(item["image"]).is_absolute() else base / item["image"]
    if any(isinstance(v, (int, float)) and v > 1.0 for b in boxes for v in b):
        try:
            w, h = _image_size(image)
        except (OSError, ValueError) as exc:
            raise RecordError("unreadable file", f"image {image}: {exc}") from exc
        boxes = [[b[0] / w, b[1] / h, b[2] / w, b[3] / h] for b in boxes]
    out: dict[str, Any] = {
        "id": str(item.get("id", f"{stem}:{index}")),
        "image": str(image),
        "depth_image": item.get("depth_image"),
        "question": strip_instruction(item["problem"]),
        "answer": item["response"].strip(),
        "answer_type": infer_answer_type(item["response"]),
        "gt_boxes": boxes,
        "qtype": str(item.get("dataset", "")),
    }
    messages = item.get("messages") if isinstance(item.get("messages"), list) else []
    assistant = [m.get("content") for m in messages if isinstance(m, dict) and m.get("role") == "assistant"]
    if len(assistant) == 1 and isinstance(assistant[0], str):
        parsed = parse_response(assistant[0])
        if parsed.error is None:
            out["trace"] = [
                {"boxes": [{"bbox_2d": list(b[:4]), "depth": b.depth} for b in area], "text": text}
                for area, text in zip(parsed.areas, parsed.texts)
            ]
        else:
            report.notes[f"trace dropped (malformed: {parsed.error.split(':')[0]})"] += 1
    else:
        report.notes["no assistant trace"] += 1
    return out


def load_sif50k(path: str | os.PathLike, check_files: str = "header") -> tuple[list[Record], SkipReport]:
    """Read a SIF-50K JSON list (or JSONL of such items) into Records; bad items are skipped, named and counted.

    Relative image paths are resolved against the JSON file's folder.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"SIF-50K file not found: {path}")
    text = path.read_text(encoding="utf-8")
    report = SkipReport(source=str(path))
    try:
        items = json.loads(text)
        located = [(f"{path}[{i}]", item) for i, item in enumerate(items)] if isinstance(items, list) else None
    except ValueError:
        located = None
    if located is None:  # JSONL
        located = []
        for lineno, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    located.append((f"{path}:{lineno}", json.loads(line)))
                except ValueError as exc:
                    report.total += 1
                    report.add_skip(f"{path}:{lineno}", RecordError("invalid JSON", str(exc)[:200]))
    base = path.parent.resolve()
    records = []
    for index, (where, item) in enumerate(located):
        report.total += 1
        try:
            record = record_from_json(_item_to_json(item, index, base, path.stem, report), base, check_files)
            records.append(dataclasses.replace(record, origin=where))
        except RecordError as err:
            report.add_skip(where, err)
    report.loaded = len(records)
    return records, report
