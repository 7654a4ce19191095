"""Teacher-forced scores of a record's reference trace: its cross-entropy and where the model's greedy next token
departs from it, by part of the trace.

A greedy evaluation says *that* answers are wrong; the parts say *where* a trace goes wrong. In one forward pass
over the SFT example (prompt + reference response), each assistant token's greedy prediction is compared with
the reference token, and the tokens are grouped by the part of the trace they overlap (:func:`part_spans`):

* ``names``: the object phrases ("the blue sphere") of the first ``<text>`` that the question names: copied from
  it;
* ``seen``: the object phrases of the first ``<text>`` that the question does not name (the colour of "What color
  is the farthest cube?", the objects counted by "How many cylinders?"): read from the image;
* ``boxes``: the numbers inside ``<area>…</area>``: box coordinates and depths, read from the image;
* ``opener``: the first character of the last ``<text>``, which in the generator's traces names the question's
  kind ("y …" above/below, "x …" left/right, "A at depth …", "… found."): the question must be read;
* ``answer``: the inside of ``<answer>…</answer>``, a restatement of the last ``<text>``'s conclusion.

``names`` and ``opener`` follow the generator's trace template (``engine.data.traces``); on free-form traces
they score whatever "the X Y" phrases and first letters they find.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from engine.data.schema import Record
from engine.models import Processor
from engine.models.packing import packed_hidden
from engine.train.sft import SFTViews, collate_sft, fused_linear_cross_entropy, sft_example

PARTS = ("names", "seen", "boxes", "opener", "answer")
ARGMAX_CHUNK_ROWS = 256  # [rows, V] logits at a time (V = 152k at 7B)

_AREA = re.compile(r"<area>(.*?)</area>", re.S)
_TEXT = re.compile(r"<text>(.*?)</text>", re.S)
_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.S)
_NUMBER = re.compile(r"(?<![\w.])-?\d+(?:\.\d+)?")  # values, not the 2 of "bbox_2d"
_OBJECT = re.compile(r"\bthe ([a-z]+ [a-z]+)")


def part_spans(response: str, question: str | None = None) -> dict[str, list[tuple[int, int]]]:
    """Character spans ``[start, end)`` of each part of a reference response to ``question`` (see the module
    docstring; without the question every object phrase counts as ``names``)."""
    spans: dict[str, list[tuple[int, int]]] = {p: [] for p in PARTS}
    for area in _AREA.finditer(response):
        spans["boxes"] += [(area.start(1) + m.start(), area.start(1) + m.end()) for m in _NUMBER.finditer(area[1])]
    texts = list(_TEXT.finditer(response))
    if texts:
        first = texts[0]
        for m in _OBJECT.finditer(first[1]):
            part = "names" if question is None or m[1] in question else "seen"
            spans[part].append((first.start(1) + m.start(1), first.start(1) + m.end(1)))
        spans["opener"] = [(texts[-1].start(1), texts[-1].start(1) + 1)]
    spans["answer"] = [m.span(1) for m in _ANSWER.finditer(response)]
    return spans


def token_offsets(token_ids: Sequence[int], processor: Processor) -> list[tuple[int, int]]:
    """Character span of each token in the decoded string of ``token_ids`` (decoded prefix by prefix, so a
    multi-byte character belongs to the token that completes it)."""
    out, done = [], 0
    for i in range(len(token_ids)):
        end = len(processor.tokenizer.decode(list(token_ids[: i + 1])))
        out.append((done, end))
        done = end
    return out


@dataclass
class ReferenceScore:
    """One record's teacher-forced reference trace: mean cross-entropy (nats per scored token) and, per part,
    [greedy hits, tokens]."""

    cross_entropy: float
    part_hits: dict[str, list[int]]


def _greedy(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """int64 [N]: argmax of ``hidden [N, H] @ weight[V, H].T``, ``ARGMAX_CHUNK_ROWS`` rows at a time."""
    out = [(hidden[i : i + ARGMAX_CHUNK_ROWS] @ weight.T).argmax(-1) for i in range(0, len(hidden), ARGMAX_CHUNK_ROWS)]
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long, device=hidden.device)


def score_reference(
    model: nn.Module,
    processor: Processor,
    record: Record,
    with_depth: bool,
    parts: bool = True,
    views: SFTViews | None = None,
) -> ReferenceScore:
    """Teacher-forced score of ``record``'s reference trace and answer (call under ``no_grad``), as the SFT of
    ``views`` shows it (crop mode: each area's crops follow its ``</area>``, as the policy sees them; None: text);
    ``parts=False`` skips the greedy comparison (the cross-entropy alone)."""
    example = sft_example(record, processor, with_depth=with_depth, max_seq_len=1 << 30, views=views)
    device = model.lm_head_weight.device
    packed = collate_sft([example], model.config, device)
    hidden = packed_hidden(model, packed)
    loss_sum = fused_linear_cross_entropy(hidden, model.lm_head_weight, packed.target_ids)
    ce = float(loss_sum) / max(1, packed.num_targets)
    hits = {p: [0, 0] for p in PARTS}
    if parts:
        right = (_greedy(hidden, model.lm_head_weight) == packed.target_ids).tolist()
        offsets = token_offsets(example.input_ids[example.assistant_mask].tolist(), processor)
        for part, spans in part_spans(record.response(), record.question).items():
            for start, end in spans:
                for ok, (a, b) in zip(right, offsets):
                    if a < end and b > start:
                        hits[part][0] += int(ok)
                        hits[part][1] += 1
    return ReferenceScore(ce, hits)


def pooled_accuracy(hit_counts: Sequence[dict[str, list[int]] | None]) -> dict[str, float | None]:
    """Token accuracy per part over several records' [hits, tokens] (None for a part no record has; a record's
    missing part counts as no tokens, as in rows written before that part existed)."""
    out: dict[str, float | None] = {}
    for part in PARTS:
        hits = sum(h.get(part, (0, 0))[0] for h in hit_counts if h)
        total = sum(h.get(part, (0, 0))[1] for h in hit_counts if h)
        out[part] = hits / total if total else None
    return out
