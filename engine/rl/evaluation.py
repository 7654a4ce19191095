"""Held-out evaluation of a SIF policy, with the baselines and the answer distribution beside every number.

One implementation for ``recipes/eval_sif.py`` and the end of the SFT and GRPO recipes. Per record: the answer
score (``engine.data.answers.answers_match``; a ``box`` answer counts as correct at IoU ≥ 0.5), a missing or
malformed answer counts as wrong, the format reward, the grounding IoU of the last area with the ground truth
(``box_set_iou``; 0 without an area) and the depth reward. Per question type, :func:`summarise` adds:

* ``chance``: the expected accuracy of a uniform guess: 1/|options| for choice questions, 1/|distinct true
  answers of that type in the split| for word and number questions, 0 for boxes;
* ``majority``: the accuracy of always giving that type's most frequent true answer in the split;
* ``top_pred`` / ``top_pred_share``: the most frequent predicted answer (normalised; ``<none>`` when no answer
  was given) and its share of that type's predictions, beside ``top_true_share``, the share of the most frequent
  true answer. A policy that has collapsed onto one answer shows ``top_pred_share`` far above ``top_true_share``;
* ``image_gap``: how much the model relies on the image, in nats per scored token: the teacher-forced
  cross-entropy of each record's reference trace under another record's picture minus under its own
  (:func:`image_reliance`). About 0 means the model's traces do not depend on what the image shows: its answers
  can then be no better than the majority answer, whatever the reward, and the report warns;
* ``reference_tokens``: in the same teacher-forced pass, the share of the reference trace's tokens that are the
  model's greedy next token, per part (``engine.rl.trace_reading``): the objects of the first text that the
  question names (copied from it) and those it does not (read from the image), the box numbers, the last text's
  opener (the question's kind) and the answer, each trace shown as the mode's SFT shows it (crop mode: with its
  views). It says where the model's own traces leave the question.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal, NamedTuple

import torch
import torch.distributed as dist
from torch import nn

from engine.data.answers import normalize_answer
from engine.data.images import MediaError
from engine.data.schema import Record
from engine.distributed import unsharded
from engine.models import Processor
from engine.rl.grpo import RLConfig
from engine.rl.iou import box_set_iou
from engine.rl.prompts import build_prompt
from engine.rl.rewards import answer_score, format_reward, score_completions
from engine.rl.rollout import generate_rollouts
from engine.rl.trace_reading import PARTS, pooled_accuracy, score_reference
from engine.train.sft import SFTViews

BOX_CORRECT_IOU = 0.5
NO_ANSWER = "<none>"
COLLAPSE_MARGIN = 0.20
IMAGE_BLIND_GAP = 0.01  # nats per scored token: below this, the traces do not depend on the image


@dataclass
class EvalConfig:
    """How to decode for evaluation: focusing mode, length, prompts per generate call, temperature (0: greedy).

    prompt_depth_image: override the mode's choice of showing the colour-mapped depth image (None: crop mode
    shows it). max_views / crop_size / depth_views: the crop-mode settings, as in ``RLConfig``.
    """

    focus_mode: Literal["text", "crop"] = "text"
    prompt_depth_image: bool | None = None
    max_new_tokens: int = 1024
    batch_size: int = 8
    temperature: float = 0.0
    max_views: int = 4
    crop_size: int = 112
    depth_views: bool = True

    def sft_views(self) -> SFTViews | None:
        """How the reference traces are shown when scored teacher-forced: with this mode's crop views, or None."""
        if self.focus_mode == "text":
            return None
        return SFTViews("crop", self.max_views, self.crop_size, self.depth_views)

    def rl_config(self) -> RLConfig:
        return RLConfig(
            temperature=self.temperature,
            max_completion_length=self.max_new_tokens,
            focus_mode=self.focus_mode,
            prompt_depth_image=self.prompt_depth_image,
            max_views=self.max_views,
            crop_size=self.crop_size,
            depth_views=self.depth_views,
        )


def evaluate_records(model: nn.Module, processor: Processor, records: Sequence[Record], cfg: EvalConfig) -> list[dict]:
    """Per-record results on this process: id, qtype, answer_type, target, answer (or None), pred (normalised),
    correct (0/1), score, format, iou, depth, completion (the generated text)."""
    rl = cfg.rl_config()
    rows = []
    for start in range(0, len(records), cfg.batch_size):
        chunk = records[start : start + cfg.batch_size]
        prompts = [build_prompt(r, processor, with_depth=rl.depth_in_prompt) for r in chunk]
        with torch.no_grad():
            batch = generate_rollouts(model, processor, prompts, rl, num_samples=1)
            reliance = image_reliance(
                model, processor, [p.record for p in prompts], with_depth=rl.depth_in_prompt, views=cfg.sft_views()
            )
        rewards = score_completions(batch.texts, batch.prompt_index, [p.target for p in prompts])
        for i, (p, parsed) in enumerate(zip(prompts, rewards.parsed)):
            record = p.record
            score = answer_score(parsed.answer, p.target)
            correct = score >= BOX_CORRECT_IOU if record.answer_type == "box" else score >= 1.0
            iou = box_set_iou([b[:4] for b in parsed.areas[-1]], p.target.gt_boxes) if parsed.areas else 0.0
            rows.append(
                {
                    "id": record.id,
                    "qtype": record.qtype or record.answer_type,
                    "answer_type": record.answer_type,
                    "target": record.answer,
                    "options": len(record.options) if record.options else 0,
                    "answer": parsed.answer,
                    "pred": _normalised(parsed.answer, record.answer_type),
                    "correct": float(correct),
                    "score": score,
                    "format": format_reward(parsed),
                    "iou": iou,
                    "depth": float(rewards.terms["depth"][i]),
                    "ce_own_image": None if reliance[i] is None else reliance[i].own,
                    "ce_other_image": None if reliance[i] is None else reliance[i].other,
                    "reference_hits": None if reliance[i] is None else reliance[i].part_hits,
                    "completion": batch.texts[i],
                }
            )
    return rows


def with_other_pictures(records: Sequence[Record]) -> list[Record | None]:
    """Each record with the picture (and depth) of the next record in ``records`` (cyclically) that shows a
    different image file; None where no record does."""
    records = list(records)
    out: list[Record | None] = []
    for i, record in enumerate(records):
        partner = next((r for r in records[i + 1 :] + records[:i] if r.image != record.image), None)
        out.append(
            None
            if partner is None
            else replace(record, image=partner.image, depth=partner.depth, depth_image=partner.depth_image)
        )
    return out


class Reliance(NamedTuple):
    """One record's teacher-forced reference trace: CE (nats per token) under its own image and under another
    record's, and per part of the trace [greedy hits, tokens] under its own (``engine.rl.trace_reading``)."""

    own: float
    other: float
    part_hits: dict[str, list[int]]


def image_reliance(
    model: nn.Module,
    processor: Processor,
    records: Sequence[Record],
    with_depth: bool,
    views: SFTViews | None = None,
) -> list[Reliance | None]:
    """Per record, its :class:`Reliance`: the other picture is the next record's in ``records`` (cyclically) that
    shows a different image file, depth included (in crop mode, ``views``, the crops are cut from it too); None for
    a record without a trace, without such a partner, or whose media cannot be decoded. Call under ``no_grad``."""
    out: list[Reliance | None] = []
    for record, swapped in zip(records, with_other_pictures(records)):
        if not record.trace or swapped is None:
            out.append(None)
            continue
        try:
            own = score_reference(model, processor, record, with_depth, views=views)
            other = score_reference(model, processor, swapped, with_depth, parts=False, views=views)
        except MediaError:
            out.append(None)
            continue
        out.append(Reliance(own.cross_entropy, other.cross_entropy, own.part_hits))
    return out


def evaluate(
    model: nn.Module,
    processor: Processor,
    records: Sequence[Record],
    cfg: EvalConfig,
    *,
    rank: int = 0,
    world_size: int = 1,
) -> list[dict]:
    """Rows of every record (in ``records`` order, on every rank): each rank decodes ``records[rank::world_size]``
    with the parameters gathered (an FSDP2 model stays sharded outside the call), then the rows are gathered.
    The model's train/eval mode is restored afterwards."""
    was_training = model.training
    model.eval()
    try:
        with unsharded(model):
            mine = evaluate_records(model, processor, list(records[rank::world_size]), cfg)
    finally:
        model.train(was_training)
    if world_size == 1 or not dist.is_initialized():
        return mine
    gathered: list[Any] = [None] * world_size
    dist.all_gather_object(gathered, mine)
    order = {r.id: k for k, r in enumerate(records)}
    return sorted((row for part in gathered for row in part), key=lambda row: order[row["id"]])


def _normalised(answer: str | None, answer_type: str) -> str:
    if answer is None or not answer.strip():
        return NO_ANSWER
    return normalize_answer(answer, answer_type) or NO_ANSWER


def _mean(rows: Sequence[Mapping[str, Any]], key: str) -> float:
    return sum(float(r[key]) for r in rows) / len(rows) if rows else 0.0


def type_summary(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Accuracy, IoU, format, depth, the baselines and the answer distribution of one question type's rows."""
    n = len(rows)
    truths = Counter(normalize_answer(r["target"], r["answer_type"]) for r in rows)
    preds = Counter(r["pred"] for r in rows)
    answer_type = rows[0]["answer_type"] if rows else "word"
    if answer_type == "box":
        chance = 0.0
    elif answer_type == "choice":
        chance = _mean([{"c": 1.0 / r["options"] if r["options"] else 0.0} for r in rows], "c")
    else:
        chance = 1.0 / len(truths) if truths else 0.0
    top_true, top_true_n = truths.most_common(1)[0] if truths else ("", 0)
    top_pred, top_pred_n = preds.most_common(1)[0] if preds else ("", 0)
    return {
        **_reliance(rows),
        "n": n,
        "accuracy": _mean(rows, "correct"),
        "iou": _mean(rows, "iou"),
        "format": _mean(rows, "format"),
        "depth": _mean(rows, "depth"),
        "chance": chance,
        "majority": top_true_n / n if n and answer_type != "box" else 0.0,
        "majority_answer": top_true,
        "top_pred": top_pred,
        "top_pred_share": top_pred_n / n if n else 0.0,
        "top_true_share": top_true_n / n if n else 0.0,
        "distinct_preds": len(preds),
    }


def _reliance(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """``image_gap`` (mean CE under another image minus under the own one), ``ce_own_image`` and
    ``reference_tokens`` (token accuracy per trace part) over the rows that have them; None when none has."""
    pairs = [(r["ce_own_image"], r["ce_other_image"]) for r in rows if r.get("ce_own_image") is not None]
    if not pairs:
        return {"image_gap": None, "ce_own_image": None, "reference_tokens": None}
    return {
        "image_gap": sum(other - own for own, other in pairs) / len(pairs),
        "ce_own_image": sum(own for own, _ in pairs) / len(pairs),
        "reference_tokens": pooled_accuracy([r.get("reference_hits") for r in rows]),
    }


def summarise(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Overall means, the overall baselines (record-weighted means of the per-type ones) and ``by_qtype``."""
    by_type: dict[str, list[Mapping[str, Any]]] = defaultdict(list)
    for r in rows:
        by_type[r["qtype"]].append(r)
    types = {q: type_summary(part) for q, part in sorted(by_type.items())}
    n = max(len(rows), 1)
    weighted = lambda key: sum(t[key] * t["n"] for t in types.values()) / n
    return {
        "num_records": len(rows),
        "accuracy": _mean(rows, "correct"),
        "format_rate": _mean(rows, "format"),
        "iou": _mean(rows, "iou"),
        "depth": _mean(rows, "depth"),
        "answered": sum(r["answer"] is not None for r in rows) / n,
        "chance": weighted("chance") if rows else 0.0,
        "majority": weighted("majority") if rows else 0.0,
        **_reliance(rows),
        "by_qtype": types,
    }


def collapsed_types(summary: Mapping[str, Any], margin: float = COLLAPSE_MARGIN) -> dict[str, tuple[str, float, float]]:
    """Question types whose most frequent prediction covers more than ``margin`` more of the predictions than the
    most frequent true answer covers of the truths: qtype -> (answer, predicted share, true share)."""
    return {
        q: (t["top_pred"], t["top_pred_share"], t["top_true_share"])
        for q, t in summary["by_qtype"].items()
        if t["top_pred_share"] > t["top_true_share"] + margin
    }


def format_summary(summary: Mapping[str, Any], title: str) -> str:
    """The table a person reads: one line per question type with its baselines and answer distribution."""
    lines = [
        f"[eval] {title}: {summary['num_records']} records",
        f"  accuracy {summary['accuracy']:.3f} (chance {summary['chance']:.3f}, majority {summary['majority']:.3f})"
        f"  format {summary['format_rate']:.3f}  IoU {summary['iou']:.3f}  depth {summary['depth']:.3f}"
        f"  answered {summary['answered']:.3f}",
        f"  {'qtype':<15} {'n':>4} {'acc':>6} {'chance':>6} {'major':>6} {'IoU':>6} {'fmt':>5} {'img':>6}"
        "  top predicted answer (share; top true share)",
    ]
    for q, t in summary["by_qtype"].items():
        lines.append(
            f"  {q:<15} {t['n']:>4} {t['accuracy']:>6.3f} {t['chance']:>6.3f} {t['majority']:>6.3f} {t['iou']:>6.3f}"
            f" {t['format']:>5.2f} {_gap(t):>6}  {t['top_pred'][:24]!r} ({t['top_pred_share']:.2f};"
            f" {t['top_true_share']:.2f})"
        )
    if summary.get("image_gap") is not None:
        lines.insert(
            2,
            f"  image reliance (img): the reference traces cost {summary['image_gap']:+.4f} nats/token more under "
            f"another record's image (own image {summary['ce_own_image']:.3f})",
        )
        tokens = summary.get("reference_tokens") or {}
        if any(v is not None for v in tokens.values()):
            cells = "  ".join(f"{p} {'-' if tokens.get(p) is None else format(tokens[p], '.2f')}" for p in PARTS)
            lines.insert(3, f"  reference traces, teacher-forced token accuracy by part: {cells}")
        if summary["image_gap"] < IMAGE_BLIND_GAP:
            lines.append(
                f"  WARNING: the model does not use the image (image gap {summary['image_gap']:+.4f} < "
                f"{IMAGE_BLIND_GAP} nats/token): its answers can be no better than the blind majority answer"
            )
    for q, (answer, share, true_share) in collapsed_types(summary).items():
        lines.append(
            f"  WARNING: {q} collapsed: {answer!r} is {share:.0%} of the predictions, the most common true answer "
            f"{true_share:.0%}"
        )
    return "\n".join(lines)


def _gap(t: Mapping[str, Any]) -> str:
    return "-" if t.get("image_gap") is None else f"{t['image_gap']:+.3f}"


def format_comparison(summaries: Mapping[str, Mapping[str, Any]]) -> str:
    """Accuracy (and last-area IoU) per question type of several evaluated models side by side, with the
    baselines of the split (taken from the first summary; all must come from the same records)."""
    names = list(summaries)
    first = summaries[names[0]]
    head = f"  {'qtype':<15} {'n':>4} {'chance':>6} {'major':>6}" + "".join(f" {n[:14]:>14}" for n in names)
    lines = [head]
    for q, t in first["by_qtype"].items():
        cells = "".join(
            f" {s['by_qtype'][q]['accuracy']:>6.3f}/{s['by_qtype'][q]['iou']:<7.3f}" for s in summaries.values()
        )
        lines.append(f"  {q:<15} {t['n']:>4} {t['chance']:>6.3f} {t['majority']:>6.3f}{cells}")
    overall = "".join(f" {s['accuracy']:>6.3f}/{s['iou']:<7.3f}" for s in summaries.values())
    lines.append(f"  {'all':<15} {first['num_records']:>4} {first['chance']:>6.3f} {first['majority']:>6.3f}{overall}")
    fmt = "".join(f" {s['format_rate']:>14.3f}" for s in summaries.values())
    lines.append(f"  {'format':<15} {'':>4} {'':>6} {'':>6}{fmt}")
    gaps = "".join(f" {_gap(s):>14}" for s in summaries.values())
    lines.append(f"  {'image gap':<15} {'':>4} {'':>6} {'':>6}{gaps}")
    lines.insert(0, "  (cells: accuracy/IoU of the last area)")
    return "\n".join(lines)


def write_eval(path: str | Path, summaries: Mapping[str, Mapping[str, Any]], rows: Mapping[str, Sequence]) -> Path:
    """``eval.json``: per evaluated model its summary and per-record rows."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {name: {"summary": summaries[name], "records": list(rows[name])} for name in summaries}
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path


def plot_eval(summaries: Mapping[str, Mapping[str, Any]], out_path: str | Path, title: str = "") -> Path:
    """Grouped bars per question type: chance, majority answer, then each evaluated model's accuracy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(summaries)
    first = summaries[names[0]]
    types = list(first["by_qtype"]) + ["all"]

    def value(s: Mapping[str, Any], q: str, key: str) -> float:
        return float(s[key] if q == "all" else s["by_qtype"][q][key])

    series = [("chance", [value(first, q, "chance") for q in types], "#bbbbbb")]
    series.append(("majority answer", [value(first, q, "majority") for q in types], "#777777"))
    colours = ["#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3"]
    for k, name in enumerate(names):
        series.append((name, [value(summaries[name], q, "accuracy") for q in types], colours[k % len(colours)]))
    width = 0.8 / len(series)
    fig, ax = plt.subplots(figsize=(max(8, 1.2 * len(types)), 4.5))
    for k, (label, heights, colour) in enumerate(series):
        xs = [i + (k - (len(series) - 1) / 2) * width for i in range(len(types))]
        ax.bar(xs, heights, width, label=label, color=colour)
    ax.set_xticks(range(len(types)), types, rotation=20)
    ax.set_ylim(0, 1)
    ax.set_ylabel("held-out accuracy")
    ax.set_title(title or f"held-out accuracy by question type ({first['num_records']} records)")
    ax.legend(fontsize=8, ncols=min(len(series), 5))
    fig.tight_layout()
    out_path = Path(out_path)
    fig.savefig(out_path, dpi=110)
    plt.close(fig)
    return out_path


def report(named_rows: Mapping[str, Sequence[Mapping[str, Any]]], out_dir: str | Path, title: str) -> dict:
    """Summarise each evaluated model's rows, print its table and (with several) the side-by-side comparison,
    write ``out_dir/eval.json`` and ``out_dir/eval.png``; returns name -> summary."""
    summaries = {name: summarise(rows) for name, rows in named_rows.items()}
    for name, summary in summaries.items():
        print(format_summary(summary, f"{title}, {name}"))
    if len(summaries) > 1:
        print(f"[eval] {title}, side by side:\n{format_comparison(summaries)}", flush=True)
    out_dir = Path(out_dir)
    write_eval(out_dir / "eval.json", summaries, named_rows)
    plot_eval(summaries, out_dir / "eval.png", title=f"{title}: held-out accuracy by question type")
    return summaries
