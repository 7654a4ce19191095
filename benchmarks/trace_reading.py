"""Where does a SIF policy lose the question? Teacher-forced token accuracy of the reference trace, by part.

A greedy held-out evaluation says *that* the answers are wrong; this says *where* the trace goes wrong. Each
held-out record's reference trace is scored in one forward pass (the SFT example: its prompt and the reference
response), and the greedy prediction of every assistant token is compared with the reference token. The tokens are
grouped by the part of the trace they belong to:

* ``names``: the object phrases of the first ``<text>`` ("Find the blue sphere and the red sphere."): the
  objects the question names, to be copied from it;
* ``boxes``: the numbers inside ``<area>…</area>`` (box coordinates and depths: from the image);
* ``opener``: the first token of the last ``<text>``, which names the question's kind ("y …" for above/below,
  "x …" for left/right, "… found." for counting): it needs the question read;
* ``answer``: the tokens inside ``<answer>…</answer>``, which restate the conclusion of the last ``<text>``
  right before them (a copy at a distance of a few tokens).

High ``opener`` accuracy with low ``names`` and ``answer`` accuracy means the model tells question kinds apart from
the trace's context but does not copy: its own first line then names the wrong objects, and its answers do not
follow its conclusions. The same table under another record's image (``--swap``) shows which parts use the image.

    python -m benchmarks.trace_reading runs/sft-tiny/hf                  # the bundled held-out split
    python -m benchmarks.trace_reading runs/sft-tiny/hf --data SPLIT --limit 100 --swap
"""

from __future__ import annotations

import argparse
import json
import re
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import replace

import torch

from engine.data.schema import Record
from engine.models import Processor, from_pretrained, processor_from_pretrained
from engine.models.packing import pack_sequences
from engine.recipes.splits import load_split
from engine.train.sft import sft_example

PARTS = ("names", "boxes", "opener", "answer")
_AREA = re.compile(r"<area>(.*?)</area>", re.S)
_TEXT = re.compile(r"<text>(.*?)</text>", re.S)
_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.S)
_NUMBER = re.compile(r"(?<![\w.])-?\d+(?:\.\d+)?")  # values, not the 2 of "bbox_2d"
_OBJECT = re.compile(r"\bthe ([a-z]+ [a-z]+)")


def part_spans(response: str) -> dict[str, list[tuple[int, int]]]:
    """Character spans ``[start, end)`` of each part of a reference response (see the module docstring): the
    object phrases of the first ``<text>``, the numbers inside areas, the first character of the last ``<text>``
    and the answer."""
    spans: dict[str, list[tuple[int, int]]] = {p: [] for p in PARTS}
    for area in _AREA.finditer(response):
        spans["boxes"] += [(area.start(1) + m.start(), area.start(1) + m.end()) for m in _NUMBER.finditer(area[1])]
    texts = list(_TEXT.finditer(response))
    if texts:
        first = texts[0]
        spans["names"] = [(first.start(1) + m.start(1), first.start(1) + m.end(1)) for m in _OBJECT.finditer(first[1])]
        spans["opener"] = [(texts[-1].start(1), texts[-1].start(1) + 1)]
    spans["answer"] = [m.span(1) for m in _ANSWER.finditer(response)]
    return spans


def token_offsets(token_ids: Sequence[int], processor: Processor) -> list[tuple[int, int]]:
    """Character span of each token in the decoded string of ``token_ids`` (decoded prefix by prefix, so a
    multi-token character is attributed to the token that completes it)."""
    out, done = [], 0
    for i in range(len(token_ids)):
        end = len(processor.tokenizer.decode(list(token_ids[: i + 1])))
        out.append((done, end))
        done = end
    return out


def part_hits(model: torch.nn.Module, processor: Processor, record: Record) -> dict[str, list[bool]]:
    """Per part, whether each of its reference tokens (every token overlapping the part's spans) is the model's
    greedy prediction given the reference prefix."""
    example = sft_example(record, processor, with_depth=False, max_seq_len=1 << 16)
    ids, mask = example.input_ids, example.assistant_mask
    packed = pack_sequences([ids], [mask], model.config, [example.pixel_values], [example.image_grid_thw])
    hidden = model(packed.input_ids, packed.position_ids, packed.cu_seqlens, packed.pixel_values, packed.image_grid_thw)
    predicted = (hidden.index_select(0, packed.source_rows) @ model.lm_head_weight.T).argmax(-1)
    right = (predicted == packed.target_ids).tolist()
    assistant = ids[mask].tolist()
    offsets = token_offsets(assistant, processor)
    hits: dict[str, list[bool]] = {p: [] for p in PARTS}
    for part, spans in part_spans(record.response()).items():
        for start, end in spans:
            hits[part] += [ok for ok, (a, b) in zip(right, offsets) if a < end and b > start]
    return hits


def table(records: Sequence[Record], hits: Sequence[dict[str, list[bool]]]) -> dict[str, dict[str, float]]:
    """Token accuracy per question kind and part (``all`` pools the kinds); NaN where a kind has no such tokens."""
    pooled: dict[str, dict[str, list[bool]]] = defaultdict(lambda: defaultdict(list))
    for record, h in zip(records, hits):
        for kind in (record.qtype or "unknown", "all"):
            for part in PARTS:
                pooled[kind][part] += h[part]
    return {
        kind: {p: (sum(v[p]) / len(v[p]) if v[p] else float("nan")) for p in PARTS} | {"n": float(len(records))}
        for kind, v in sorted(pooled.items(), key=lambda kv: (kv[0] == "all", kv[0]))
    }


def swapped(records: Sequence[Record]) -> list[Record]:
    """Each record with the next record's picture (the reference trace then describes another scene)."""
    records = list(records)
    return [replace(r, image=records[(i + 1) % len(records)].image) for i, r in enumerate(records)]


def format_table(rows: dict[str, dict[str, float]], counts: dict[str, int]) -> str:
    lines = ["| kind | n | " + " | ".join(PARTS) + " |", "|---|---|" + "---|" * len(PARTS)]
    for kind, row in rows.items():
        lines.append(f"| {kind} | {counts[kind]} | " + " | ".join(f"{row[p]:.2f}" for p in PARTS) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", help="an HF-format checkpoint folder (an SFT or GRPO export)")
    ap.add_argument("--data", default="", help="a records.jsonl or its folder (default: the bundled held-out split)")
    ap.add_argument("--limit", type=int, default=0, help="score only the first N records (0: all)")
    ap.add_argument("--swap", action="store_true", help="also score every trace under another record's image")
    ap.add_argument("--json", default="", help="also write the tables here")
    args = ap.parse_args(argv)
    records = [r for r in load_split(args.data, "heldout", args.limit) if r.trace]
    if not records:
        raise SystemExit(f"{args.data or 'the bundled held-out split'}: no records with a reference trace")
    model, processor = from_pretrained(args.model).eval(), processor_from_pretrained(args.model)
    counts = defaultdict(int, all=len(records))
    for r in records:
        counts[r.qtype or "unknown"] += 1
    out = {}
    with torch.no_grad():
        for name, recs in [("own image", records)] + ([("another image", swapped(records))] if args.swap else []):
            out[name] = table(recs, [part_hits(model, processor, r) for r in recs])
            print(f"teacher-forced token accuracy, {name} ({args.model}):\n{format_table(out[name], counts)}\n")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return out


if __name__ == "__main__":
    main()
