"""Where does a SIF policy lose the question? Teacher-forced token accuracy of the reference trace, by part.

A greedy held-out evaluation says *that* the answers are wrong; this says *where* the trace goes wrong, per
question kind (``engine.rl.trace_reading``; the held-out evaluation prints the pooled line). Each held-out
record's reference trace is scored in one forward pass (its prompt and the reference response), and the greedy
prediction of every assistant token is compared with the reference token, grouped by the part of the trace:

* ``names``: the object phrases of the first ``<text>`` ("Find the blue sphere and the red sphere.") that the
  question names, to be copied from it;
* ``seen``: the object phrases of the first ``<text>`` that the question does not name (the colour asked by an
  attribute question, the objects a counting question counts): from the image;
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
    python -m benchmarks.trace_reading runs/cvt-crop/hf --focus-mode crop      # a crop-mode policy, with its views
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from collections.abc import Sequence

import torch

from engine.data.schema import Record
from engine.models import from_pretrained, processor_from_pretrained
from engine.recipes.splits import load_split
from engine.rl.evaluation import EvalConfig, with_other_pictures
from engine.rl.trace_reading import PARTS, pooled_accuracy, score_reference


def table(records: Sequence[Record], hits: Sequence[dict[str, list[int]]]) -> dict[str, dict[str, float]]:
    """Token accuracy per question kind and part from each record's [hits, tokens] (``all`` pools the kinds);
    NaN where a kind has no such tokens."""
    by_kind: dict[str, list[dict[str, list[int]]]] = defaultdict(list)
    for record, h in zip(records, hits):
        for kind in (record.qtype or "unknown", "all"):
            by_kind[kind].append(h)
    return {
        kind: {p: float("nan") if a is None else a for p, a in pooled_accuracy(group).items()}
        for kind, group in sorted(by_kind.items(), key=lambda kv: (kv[0] == "all", kv[0]))
    }


def swapped(records: Sequence[Record]) -> list[Record]:
    """Each record with another scene's picture, paired as the evaluation's image gap pairs them
    (``engine.rl.evaluation.with_other_pictures``); a record with no such partner keeps its own."""
    return [other or record for record, other in zip(records, with_other_pictures(records))]


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
    ap.add_argument(
        "--focus-mode",
        choices=("text", "crop"),
        default="text",
        help="the mode the model was trained in: crop shows the depth image in the prompt and each area's crops",
    )
    args = ap.parse_args(argv)
    mode = EvalConfig(focus_mode=args.focus_mode)
    views, with_depth = mode.sft_views(), mode.rl_config().depth_in_prompt
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
            hits = [score_reference(model, processor, r, with_depth, views=views).part_hits for r in recs]
            out[name] = table(recs, hits)
            print(f"teacher-forced token accuracy, {name} ({args.model}):\n{format_table(out[name], counts)}\n")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return out


if __name__ == "__main__":
    main()
