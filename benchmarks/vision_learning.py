"""Does a model learn to look? Held-out learning curves of single-answer perception questions, from random weights.

Each task asks one question per scene whose answer is in the image and nowhere else, trains the tiny default
(``engine.models.tiny``, random weights) on the answer alone (SFT: chat template, image, question, one-word
answer) and scores the first answer token greedily on held-out scenes, beside the majority answer:

* ``halves`` (the positive control): a scene with its left or right half darkened to 40 %; "Which half of the
  image is darker?" → left / right. The signal covers half of the image tokens.
* ``presence``: "Is there a {colour} object in the image?" → yes / no, colours drawn present or absent with
  equal odds. The signal covers the few tokens of one object.
* ``color1``: one-object scenes, "What color is the object?" → one of 8 colours.

Scenes come from the generator (``engine.data.synth``, seed ``--seed`` for training, ``--seed + 1`` held out).
The model, the processor and the SFT objective are the engine's own, so a change that makes the tiny model see
shows here first, in minutes on a GPU.

    python -m benchmarks.vision_learning --tasks halves,presence,color1 --steps 2000 --device cuda
    python -m benchmarks.vision_learning --tasks color1 --fov-deg 22 --steps 300   # larger objects
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import torch

from engine.data.images import load_image
from engine.data.messages import sif_messages
from engine.data.render import COLORS
from engine.data.schema import Record, load_records
from engine.data.synth import SynthConfig, generate_dataset
from engine.models import from_pretrained, processor_from_pretrained
from engine.models.packing import packed_hidden
from engine.models.tiny import create_tiny_checkpoint
from engine.train.sft import SFTExample, SFTObjective, collate_sft, scored_tokens

Question = Callable[[Record, random.Random], tuple[str, str, torch.Tensor]]
"""(record, rng) -> (question, answer, RGB uint8 [H, W, 3])."""

HELD_OUT = 96


def halves(record: Record, rng: random.Random) -> tuple[str, str, torch.Tensor]:
    rgb = load_image(record.image).clone()
    answer = rng.choice(["left", "right"])
    half = slice(0, rgb.shape[1] // 2) if answer == "left" else slice(rgb.shape[1] // 2, None)
    rgb[:, half] = (rgb[:, half].float() * 0.4).to(torch.uint8)
    return "Which half of the image is darker, left or right?", answer, rgb


def presence(record: Record, rng: random.Random) -> tuple[str, str, torch.Tensor]:
    present = sorted({o["color"] for o in record.meta["scene"]["objects"]})
    want = rng.random() < 0.5
    colour = rng.choice(present if want else sorted(set(COLORS) - set(present)))
    return f"Is there a {colour} object in the image?", "yes" if want else "no", load_image(record.image)


def color1(record: Record, rng: random.Random) -> tuple[str, str, torch.Tensor]:
    (obj,) = record.meta["scene"]["objects"]
    return "What color is the object?", obj["color"], load_image(record.image)


TASKS: dict[str, tuple[Question, SynthConfig]] = {
    "halves": (halves, SynthConfig(qtypes=("locate",), with_trace=False)),
    "presence": (presence, SynthConfig(qtypes=("locate",), with_trace=False)),
    "color1": (color1, SynthConfig(min_objects=1, max_objects=1, qtypes=("locate",), with_trace=False)),
}


def scenes(root: Path, name: str, cfg: SynthConfig, n: int, seed: int, workers: int) -> list[Record]:
    """``n`` one-question records of distinct scenes (generated once into ``root/name``)."""
    out = root / name
    if not (out / "records.jsonl").is_file():
        generate_dataset(out, n, seed, cfg, workers=workers)
    records, _ = load_records(out / "records.jsonl", check_files="none")
    return records[:n]


def example(processor, record: Record, question: str, answer: str, rgb: torch.Tensor) -> SFTExample:
    """The chat-templated record with ``question`` and the one-word ``answer`` as the only scored tokens."""
    messages, images = sif_messages(dataclasses.replace(record, question=question), False, rgb, None, answer)
    out = processor.apply_chat_template(messages, images)
    mask = scored_tokens(out["input_ids"], out["assistant_mask"], processor.tokenizer)
    return SFTExample(record.id, out["input_ids"], mask, out["pixel_values"], out["image_grid_thw"])


def first_token_accuracy(model, examples: list[SFTExample], device: torch.device) -> tuple[float, float]:
    """Share of held-out examples whose first answer token is the greedy prediction, and the share of the most
    frequent prediction (1.0: a constant answer)."""
    hits, predictions = 0, Counter()
    model.eval()
    with torch.no_grad():
        for start in range(0, len(examples), 16):
            chunk = examples[start : start + 16]
            packed = collate_sft(chunk, model.config, device)
            predicted = (packed_hidden(model, packed) @ model.lm_head_weight.T).argmax(-1)
            first = torch.cumsum(torch.tensor([0] + [int(e.assistant_mask.sum()) for e in chunk[:-1]]), 0)
            for row in first.tolist():
                hits += int(predicted[row] == packed.target_ids[row])
                predictions[int(predicted[row])] += 1
    model.train()
    return hits / len(examples), predictions.most_common(1)[0][1] / len(examples)


def run_task(name: str, args: argparse.Namespace, root: Path) -> dict:
    question, synth_cfg = TASKS[name]
    if args.fov_deg:
        synth_cfg = dataclasses.replace(synth_cfg, fov_deg=args.fov_deg)
    tag = f"{name}-fov{args.fov_deg:g}" if args.fov_deg else name  # generated scenes are cached by settings
    train = scenes(root, f"{tag}-train", synth_cfg, args.scenes, args.seed, args.workers)
    held = scenes(root, f"{tag}-held", synth_cfg, HELD_OUT, args.seed + 1, args.workers)
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = from_pretrained(create_tiny_checkpoint(root / "tiny", seed=0)).to(device)
    processor = processor_from_pretrained(root / "tiny")
    held_rng = random.Random(1)
    held_questions = [question(r, held_rng) for r in held]
    held_examples = [example(processor, r, q, a, rgb) for r, (q, a, rgb) in zip(held, held_questions)]
    answers = Counter(a for _, a, _ in held_questions)
    majority = answers.most_common(1)[0][1] / len(held)
    decay = [p for p in model.parameters() if p.ndim >= 2]
    flat = [p for p in model.parameters() if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": flat, "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=args.lr)
    objective, rng, curve, t0 = SFTObjective(), random.Random(0), [], time.perf_counter()
    for step in range(args.steps + 1):
        if step % args.eval_every == 0:
            accuracy, top_share = first_token_accuracy(model, held_examples, device)
            curve.append({"step": step, "accuracy": accuracy, "top_pred_share": top_share,
                          "seconds": round(time.perf_counter() - t0, 1)})  # fmt: skip
            print(json.dumps({"task": name, **curve[-1]}), flush=True)
        if step == args.steps:
            break
        for group in optimizer.param_groups:
            group["lr"] = args.lr * min(1.0, (step + 1) / 30)
        batch = [example(processor, r, *question(r, rng)) for r in rng.sample(train, args.batch_size)]
        out = objective(model, collate_sft(batch, model.config, device))
        optimizer.zero_grad(set_to_none=True)
        (out.loss_sum / out.num_loss_units).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
    return {"task": name, "majority": majority, "chance": 1 / len(answers), "curve": curve}


def format_table(results: list[dict]) -> str:
    lines = ["| task | majority | chance | best held-out accuracy (step) | last | last top-answer share |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    for r in results:
        best = max(r["curve"], key=lambda c: c["accuracy"])
        last = r["curve"][-1]
        lines.append(
            f"| {r['task']} | {r['majority']:.3f} | {r['chance']:.3f} | {best['accuracy']:.3f} ({best['step']}) "
            f"| {last['accuracy']:.3f} | {last['top_pred_share']:.2f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tasks", default="halves,presence,color1", help=f"comma-separated, of {sorted(TASKS)}")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--eval-every", type=int, default=50)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--scenes", type=int, default=2000, help="training scenes per task")
    ap.add_argument("--seed", type=int, default=5000)
    ap.add_argument("--fov-deg", type=float, default=0.0, help="camera field of view (0: the generator's 60°; "
                    "22° makes objects about 12x larger in area)")  # fmt: skip
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--data-dir", default="", help="where scenes are generated (default: a temporary folder)")
    ap.add_argument("--json", default="", help="also write the curves here")
    args = ap.parse_args(argv)
    unknown = sorted(set(args.tasks.split(",")) - set(TASKS))
    if unknown:
        raise SystemExit(f"unknown task(s) {unknown}; expected some of {sorted(TASKS)}")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.data_dir or tmp)
        results = [run_task(name, args, root) for name in args.tasks.split(",")]
    print(format_table(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()
