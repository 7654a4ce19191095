"""Does a model learn to look? Held-out learning curves of single-answer perception questions, from random weights.

Each task asks one question per scene (``--turns K``: K, as follow-up turns), trains the tiny default
(``engine.models.tiny``, random weights) on the answers alone (SFT: chat template, image, question, one-word
answer) and scores the first answer token greedily on held-out scenes, beside the majority answer, with its
cross-entropy beside the blind one (the answers' entropy). Apart from ``echo``, every answer is in the image and
nowhere else:

* ``halves`` (the positive control): a scene with its left or right half darkened to 40 %; "Which half of the
  image is darker?" → left / right. The signal covers half of the image tokens.
* ``presence``: "Is there a {colour} object in the image?" → yes / no, colours drawn present or absent with
  equal odds. The signal covers the few tokens of one object.
* ``color1``: one-object scenes, "What color is the object?" → one of 8 colours.
* ``echo`` (the question path's control): "Which colour does this question name, {colour} or none?" → that
  colour. The answer is in the question, not the image: it measures how soon the answer reads the question.
* ``side``: "Is the {colour} {shape} in the left or the right half of the image?" → left / right, by the box
  centre of an object no other shares the name of. The answer is *where* a named object is, which image tokens
  can only say through their positions (the tower's features say what a patch shows, not where it is).
* ``ask``: the generator's own questions (``--qtypes``, default every kind with a one-word answer) answered
  directly, without the SIF trace; accuracy is reported per question kind beside that kind's majority answer.
  ``--qtypes locate`` adds "Where is the {colour} {shape}?", answered with its box: a box answer is generated
  greedily and scored by its IoU with the true box (right at IoU >= 0.5, as the held-out evaluation counts it),
  beside the prior box (the training answers' mean box, the best an answer that ignores the image can do).

Scenes come from the generator (``engine.data.synth``, seed ``--seed`` for training, ``--seed + 1`` held out),
seen with the camera of ``--framing`` (``engine.data.synth.FRAMINGS``). The model, the processor and the SFT
objective are the engine's own, so a change that makes the tiny model see shows here first; ``--rope-theta``
changes the random decoder's rotary base (``engine.models.tiny.TINY_ROPE_THETA``). ``--init`` starts
from a checkpoint instead of random weights and ``--save`` writes the trained model, so that stages chain into a
curriculum (each stage judged on its own held-out scenes); ``a+b`` trains a mixture. ``--probe N`` fits a linear
probe from the pooled vision features to the colours each scene shows: when it reads them and the model's answers
do not, the decoder is what has not learned.

    python -m benchmarks.vision_learning --tasks halves,presence,color1 --steps 2000 --device cuda
    python -m benchmarks.vision_learning --tasks color1 --fov-deg 22 --steps 300   # larger objects
    python -m benchmarks.vision_learning --tasks ask --framing close --init stage1 --save stage2
    python -m benchmarks.vision_learning --tasks side --framing close --oracle-tower --bare --rope-theta 10000
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import random
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import torch

from engine.data.answers import answers_match, box_iou, parse_box
from engine.data.images import load_image
from engine.data.messages import sif_messages
from engine.data.render import COLORS
from engine.data.schema import Record, load_records
from engine.data.synth import FRAMINGS, SynthConfig, framed, generate_dataset
from engine.models import from_pretrained, processor_from_pretrained
from engine.models.generate import generate
from engine.models.loading import save_pretrained
from engine.models.packing import packed_hidden
from engine.models.tiny import create_tiny_checkpoint, tiny_config
from engine.rl.evaluation import BOX_CORRECT_IOU
from engine.train.optim import WarmupDecay, param_groups
from engine.train.sft import SFTExample, SFTObjective, collate_sft, scored_tokens
from engine.train.vision_align import PhraseTargets

Question = Callable[[Record, random.Random], tuple[str, str, torch.Tensor]]
"""(record, rng) -> (question, answer, RGB uint8 [H, W, 3])."""

HELD_OUT = 96


def halves(record: Record, rng: random.Random) -> tuple[str, str, torch.Tensor]:
    rgb = load_image(record.image).clone()
    answer = rng.choice(["left", "right"])
    half = slice(0, rgb.shape[1] // 2) if answer == "left" else slice(rgb.shape[1] // 2, None)
    rgb[:, half] = (rgb[:, half].float() * 0.4).to(torch.uint8)
    return "Which half of the image is darker, left or right?", answer, rgb


def scene_colours(record: Record) -> set[str]:
    """The colours of the objects the record's scene shows."""
    return {o["color"] for o in record.meta["scene"]["objects"]}


def presence(record: Record, rng: random.Random) -> tuple[str, str, torch.Tensor]:
    present = sorted(scene_colours(record))
    want = rng.random() < 0.5
    colour = rng.choice(present if want else sorted(set(COLORS) - set(present)))
    return f"Is there a {colour} object in the image?", "yes" if want else "no", load_image(record.image)


def color1(record: Record, rng: random.Random) -> tuple[str, str, torch.Tensor]:
    (obj,) = record.meta["scene"]["objects"]
    return "What color is the object?", obj["color"], load_image(record.image)


def echo(record: Record, rng: random.Random) -> tuple[str, str, torch.Tensor]:
    colour = rng.choice(sorted(COLORS))
    return f"Which colour does this question name, {colour} or none?", colour, load_image(record.image)


def side(record: Record, rng: random.Random) -> tuple[str, str, torch.Tensor]:
    """Which half of the image holds one named object (the wanted side drawn first, so both answers are about as
    likely); objects whose box centre lies within 0.08 of the middle, or whose colour and shape another object
    shares, are asked about only when the scene has no other to ask about."""
    objects = record.meta["scene"]["objects"]
    names = Counter((o["color"], o["shape"]) for o in objects)

    def centre(o: dict) -> float:
        return (o["box"][0] + o["box"][2]) / 2

    askable = [o for o in objects if names[o["color"], o["shape"]] == 1 and abs(centre(o) - 0.5) >= 0.08]
    want_left = rng.random() < 0.5
    wanted = [o for o in askable if (centre(o) < 0.5) == want_left] or askable or objects
    obj = rng.choice(wanted)
    answer = "left" if centre(obj) < 0.5 else "right"
    question = f"Is the {obj['color']} {obj['shape']} in the left or the right half of the image?"
    return question, answer, load_image(record.image)


def ask(record: Record, rng: random.Random) -> tuple[str, str, torch.Tensor]:
    return record.question, record.answer, load_image(record.image)


ONE_WORD_QTYPES = ("left_right", "above_below", "nearer_farther", "counting", "size_compare", "attribute", "grounding")
"""The generator's question kinds whose answer is one word, scored by its first token (the default of ``ask``)."""
BOX_QTYPES = ("locate",)
"""The generator's question kinds answered with a box, scored by the IoU of a generated answer (``--qtypes``)."""
BOX_ANSWER_TOKENS = 40
"""Greedy tokens generated for a box answer ("[0.299, 0.227, 0.670, 0.563]" and the end of the turn)."""

TASKS: dict[str, tuple[Question, SynthConfig]] = {
    "halves": (halves, SynthConfig(qtypes=("locate",), with_trace=False)),
    "presence": (presence, SynthConfig(qtypes=("locate",), with_trace=False)),
    "color1": (color1, SynthConfig(min_objects=1, max_objects=1, qtypes=("locate",), with_trace=False)),
    "echo": (echo, SynthConfig(qtypes=("locate",), with_trace=False)),
    "side": (side, SynthConfig(qtypes=("locate",), with_trace=False)),
    "ask": (ask, SynthConfig(qtypes=ONE_WORD_QTYPES, with_trace=False)),
}


def scenes(root: Path, name: str, cfg: SynthConfig, n: int, seed: int, workers: int) -> list[Record]:
    """``n`` one-question records of distinct scenes (generated into ``root/name``, again when it holds fewer)."""
    out = root / name
    records = load_records(out / "records.jsonl", check_files="none")[0] if (out / "records.jsonl").is_file() else []
    if len(records) < n:  # scene i of a seed does not depend on n: a larger set starts with the smaller one
        generate_dataset(out, n, seed, cfg, workers=workers)
        records, _ = load_records(out / "records.jsonl", check_files="none")
    return records[:n]


def example(
    processor,
    record: Record,
    question: str,
    answer: str,
    rgb: torch.Tensor,
    bare: bool = False,
    follow_ups: list[tuple[str, str]] = (),
) -> SFTExample:
    """The chat-templated record with ``question`` and the one-word ``answer`` as the only scored tokens; ``bare``
    leaves the SIF instruction out of the user turn, so the question stands right before the answer.
    ``follow_ups``: more (question, answer) turns about the same image, each answer scored too."""
    messages, images = sif_messages(dataclasses.replace(record, question=question), False, rgb, None, answer)
    if bare:
        messages[0]["content"][-1]["text"] = "\n" + question
    for q, a in follow_ups:
        messages += [{"role": "user", "content": [{"type": "text", "text": q}]}, {"role": "assistant", "content": a}]
    out = processor.apply_chat_template(messages, images)
    mask = scored_tokens(out["input_ids"], out["assistant_mask"], processor.tokenizer)
    return SFTExample(record.id, out["input_ids"], mask, out["pixel_values"], out["image_grid_thw"])


def training_example(processor, record: Record, question: Question, rng: random.Random, args) -> SFTExample:
    """One training conversation: ``args.turns`` questions of the task about one scene (the first in the SIF user
    turn, the others as follow-up turns), every answer scored."""
    first = question(record, rng)
    follow_ups = [question(record, rng)[:2] for _ in range(args.turns - 1)]
    return example(processor, record, *first, args.bare, follow_ups)


def first_token_predictions(model, examples: list[SFTExample], device: torch.device) -> list[tuple[bool, int, float]]:
    """Per held-out example: whether the greedy prediction of its first answer token is right, that prediction, and
    the cross-entropy of the right token (nats; ln 2 for a yes/no question answered blind with even odds)."""
    out: list[tuple[bool, int, float]] = []
    model.eval()
    with torch.no_grad():
        for start in range(0, len(examples), 16):
            chunk = examples[start : start + 16]
            packed = collate_sft(chunk, model.config, device)
            logits = (packed_hidden(model, packed) @ model.lm_head_weight.T).float()
            ce = torch.nn.functional.cross_entropy(logits, packed.target_ids, reduction="none")
            predicted = logits.argmax(-1)
            first = torch.cumsum(torch.tensor([0] + [int(e.assistant_mask.sum()) for e in chunk[:-1]]), 0)
            out += [
                (bool(predicted[row] == packed.target_ids[row]), int(predicted[row]), float(ce[row]))
                for row in first.tolist()
            ]
    model.train()
    return out


def box_answers(
    model, processor, examples: list[SFTExample], truths: list[str], device: torch.device
) -> list[tuple[float, str]]:
    """Per held-out example: its greedily generated answer, and that answer's IoU with the true box ``truths[i]``
    (``answers_match`` for a box, as the held-out evaluation scores it: 0 when it names no box). The prompt is the
    example up to its first scored token (``generate`` moves it to the model's device)."""
    prompts = [
        {
            "input_ids": e.input_ids[: int(e.assistant_mask.nonzero()[0])],
            "pixel_values": e.pixel_values,
            "image_grid_thw": e.image_grid_thw,
        }
        for e in examples
    ]
    decode = "graph" if device.type == "cuda" else "eager"
    rollouts = []
    for start in range(0, len(prompts), 16):
        chunk = prompts[start : start + 16]
        rollouts += generate(model, processor, chunk, 1, BOX_ANSWER_TOKENS, temperature=0.0, decode=decode)
    return [(answers_match(r.text, truth, "box"), r.text) for r, truth in zip(rollouts, truths)]


def prior_box(answers: list[str]) -> tuple[float, float, float, float]:
    """The mean of the training split's box answers: the constant box, the baseline of a box kind."""
    boxes = torch.tensor([parse_box(a) for a in answers])
    return tuple(boxes.mean(0).tolist())


def summarise(predictions: list[tuple]) -> dict[str, float]:
    """Accuracy, the share of the most frequent prediction (1.0: a constant answer) and the mean cross-entropy of
    the right first token, of some predictions ``(right, prediction, ce)``; and the mean IoU of those that carry
    one, ``(right, prediction, ce, iou)`` (box answers)."""
    n = len(predictions)
    top = Counter(p[1] for p in predictions).most_common(1)[0][1]
    out = {
        "accuracy": sum(p[0] for p in predictions) / n,
        "top_pred_share": top / n,
        "ce": round(sum(p[2] for p in predictions) / n, 4),
    }
    ious = [p[3] for p in predictions if len(p) > 3]
    if ious:
        out["iou"] = round(sum(ious) / len(ious), 4)
    return out


def pooled_vision_features(model, processor, records: list[Record], device: torch.device) -> torch.Tensor:
    """float32 [N, 2 * D]: the mean and the max over each scene's image tokens of the vision tower's output."""
    rows = []
    model.eval()
    with torch.no_grad():
        for r in records:
            pixel_values, grid = processor.preprocess_images([load_image(r.image)])
            tokens = model.visual(pixel_values.to(device), grid.to(device)).float()
            rows.append(torch.cat([tokens.mean(0), tokens.amax(0)]).cpu())
    model.train()
    return torch.stack(rows)


def colour_presence_probe(model, processor, train: list[Record], held: list[Record], device: torch.device) -> dict:
    """Is what the questions ask in the image features at all? A linear probe (logistic regression, one output per
    colour) from :func:`pooled_vision_features` to which colours the scene shows, fitted on ``train`` and scored on
    ``held``, beside the majority answer of each colour. A probe far above the majority while the model answers at
    it says the decoder, not the vision tower, is what has not learned."""
    colours = sorted(COLORS)

    def present(records: list[Record]) -> torch.Tensor:
        return torch.tensor([[float(c in scene_colours(r)) for c in colours] for r in records])

    x_train, x_held = (pooled_vision_features(model, processor, rs, device) for rs in (train, held))
    mean, std = x_train.mean(0), x_train.std(0) + 1e-6
    x_train, x_held = (x_train - mean) / std, (x_held - mean) / std
    y_train, y_held = present(train), present(held)
    weight = torch.zeros(x_train.shape[1], len(colours), requires_grad=True)
    bias = torch.zeros(len(colours), requires_grad=True)
    optimizer = torch.optim.Adam([weight, bias], lr=1e-2)
    with torch.enable_grad():
        for _ in range(500):
            logits = x_train @ weight + bias
            loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, y_train) + 1e-3 * weight.square().sum()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    with torch.no_grad():
        accuracy = ((x_held @ weight + bias > 0).float() == y_held).float().mean().item()
    majority = torch.maximum(y_held.mean(0), 1 - y_held.mean(0)).mean().item()
    return {"accuracy": round(accuracy, 4), "majority": round(majority, 4), "train": len(train), "held": len(held)}


def answer_entropy(answers: list[str]) -> float:
    """Entropy of the answers' distribution in nats: the cross-entropy of the best answer that ignores the image."""
    counts = Counter(answers).values()
    return round(-sum(c / len(answers) * math.log(c / len(answers)) for c in counts), 4)


def by_kind(kinds: list[str], values: list) -> dict[str, list]:
    """``values`` grouped by the question kind of the same position, kinds in sorted order."""
    groups: dict[str, list] = {}
    for kind, value in sorted(zip(kinds, values), key=lambda kv: kv[0]):
        groups.setdefault(kind, []).append(value)
    return groups


def synth_config(name: str, args: argparse.Namespace, framing: str = "") -> SynthConfig:
    """The task's generator settings under ``framing`` (default: the command line's), the command line's field of
    view and question kinds."""
    cfg = TASKS[name][1]
    framing = framing or args.framing
    if framing != "default":
        cfg = framed(cfg, framing)
    if name == "color1":  # one object, whatever the framing
        cfg = dataclasses.replace(cfg, min_objects=1, max_objects=1)
    if args.fov_deg:
        cfg = dataclasses.replace(cfg, fov_deg=args.fov_deg)
    if name == "ask" and args.qtypes:
        cfg = dataclasses.replace(cfg, qtypes=tuple(args.qtypes.split(",")))
    return cfg


def lr_multiplier(step: int, args: argparse.Namespace) -> float:
    """The learning rate of ``step`` as a multiple of ``--lr``: linear warm-up over ``--warmup`` steps, then flat
    (``--schedule constant``) or decayed to ``--min-lr-ratio`` at ``--steps`` (``cosine``, ``linear``)."""
    if step < args.warmup:
        return (step + 1) / args.warmup
    return WarmupDecay(args.steps, args.warmup, args.schedule, args.min_lr_ratio)(step)


def parameter_groups(model, weight_decay: float, vision_lr_scale: float) -> list[dict]:
    """The trainer's AdamW groups (``engine.train.optim.param_groups``: matrices decay, vectors do not), each split
    into the decoder's part (``lr_scale`` 1) and the vision tower's (``lr_scale`` ``vision_lr_scale``; 0 freezes
    the tower, so its parameters leave the optimiser)."""
    if vision_lr_scale == 0:
        model.visual.requires_grad_(False)
    vision = {id(p) for p in model.visual.parameters()}
    groups = []
    for group in param_groups(model, weight_decay):
        for in_vision, scale in ((False, 1.0), (True, vision_lr_scale)):
            params = [p for p in group["params"] if (id(p) in vision) == in_vision]
            if params:
                groups.append({**group, "params": params, "lr_scale": scale})
    return groups


class OracleTower(torch.nn.Module):
    """Stands in for the vision tower (``--oracle-tower``): each image's tokens are its alignment targets
    (``engine.train.vision_align``: the decoder's initial embeddings of the words naming what each token shows),
    looked up by the image's pixel values. It bounds what a perfectly aligned tower can give the decoder."""

    def __init__(self, model, processor, position_weight: float = 0.0) -> None:
        super().__init__()
        self.targets = PhraseTargets(model.model.embed_tokens.weight.detach().clone(), processor, position_weight)
        self.by_pixels: dict[bytes, torch.Tensor] = {}

    @staticmethod
    def key(pixel_values: torch.Tensor) -> bytes:
        return hashlib.sha1(pixel_values.detach().cpu().contiguous().numpy().tobytes()).digest()

    def register(self, record: Record, example: SFTExample) -> SFTExample:
        """Remember the tokens of ``example``'s image (the record's scene) and return the example."""
        merge = self.targets.processor.image.merge_size
        _, gh, gw = (int(v) for v in example.image_grid_thw[0])
        self.by_pixels[self.key(example.pixel_values)] = self.targets(record, gh // merge, gw // merge)
        return example

    def forward(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        chunks = pixel_values.split(grid_thw.prod(-1).tolist())
        return torch.cat([self.by_pixels[self.key(c)] for c in chunks]).to(pixel_values.device)


def tiny_start(root: Path, rope_theta: float) -> Path:
    """The random tiny default (seed 0), with the decoder's rotary base ``rope_theta`` (0: the default's)."""
    if not rope_theta:
        return create_tiny_checkpoint(root / "tiny", seed=0)
    config = tiny_config()
    config.text.rope_theta = rope_theta
    return create_tiny_checkpoint(root / f"tiny-theta{rope_theta:g}", seed=0, config=config)


def scene_tag(name: str, cfg: SynthConfig) -> str:
    """A folder name that changes with every generator setting (generated scenes are cached by it)."""
    return f"{name}-{hashlib.sha1(repr(cfg).encode()).hexdigest()[:10]}"


def held_kind(task: str, framing: str, record: Record) -> str:
    """What a held-out question is scored under: the part (``side@close``), or for ``ask`` the record's question
    kind, with the part's framing when it names one (``attribute@close``), so that a mixture's framings stay apart."""
    kind = record.qtype if task == "ask" else task
    return f"{kind}@{framing}" if framing else kind


def run_task(name: str, args: argparse.Namespace, root: Path) -> dict:
    """Train one task, or a mixture ``a+b+...`` (each batch drawn from the union of the parts' scenes, every part
    scored on its own held-out scenes), and return its baselines and held-out curve. A part ``task@framing`` sees
    its scenes under that framing (``side@close+side``: the same question on large and on small objects)."""
    train: list[tuple[Record, Question]] = []
    held: list[tuple[Record, Question, str]] = []
    for part in name.split("+"):
        task, _, framing = part.partition("@")
        question, synth_cfg = TASKS[task][0], synth_config(task, args, framing)
        tag = scene_tag(task, synth_cfg)
        train += [(r, question) for r in scenes(root, f"{tag}-train", synth_cfg, args.scenes, args.seed, args.workers)]
        for r in scenes(root, f"{tag}-held", synth_cfg, args.held_out, args.seed + 1, args.workers):
            held.append((r, question, held_kind(task, framing, r)))
    device = torch.device(args.device)
    torch.manual_seed(0)
    start = Path(args.init) if args.init else tiny_start(root, args.rope_theta)
    model = from_pretrained(start).to(device)
    processor = processor_from_pretrained(start)
    oracle = OracleTower(model, processor, args.oracle_position) if args.oracle_tower else None
    if oracle is not None:
        model.visual = oracle
    register = oracle.register if oracle is not None else lambda record, e: e
    held_rng = random.Random(1)
    held_questions = [question(r, held_rng) for r, question, _ in held]
    held_examples = [
        register(r, example(processor, r, q, a, rgb, args.bare)) for (r, _, _), (q, a, rgb) in zip(held, held_questions)
    ]
    kinds = [kind for _, _, kind in held]
    answers = by_kind(kinds, [a for _, a, _ in held_questions])
    baselines = {
        k: {
            "n": len(a),
            "majority": Counter(a).most_common(1)[0][1] / len(a),
            "chance": 1 / len(set(a)),
            "blind_ce": answer_entropy(a),
        }
        for k, a in answers.items()
    }
    boxed = [i for i, (r, q, _) in enumerate(held) if q is ask and r.answer_type == "box"]  # the record's own box
    if boxed:  # a box kind's baseline is the prior box, right where it overlaps the true box by half
        prior = prior_box([r.answer for r, q in train if q is ask and r.answer_type == "box"])
        for k in sorted({kinds[i] for i in boxed}):
            ious = [box_iou(prior, parse_box(a)) for a in answers[k]]
            hits = sum(v >= BOX_CORRECT_IOU for v in ious) / len(ious)
            baselines[k] |= {"majority": hits, "chance": hits, "blind_ce": 0.0, "prior_iou": sum(ious) / len(ious)}
    all_answers = Counter(a for _, a, _ in held_questions)
    majority = sum(b["majority"] * b["n"] for b in baselines.values()) / len(held)
    probe_scenes = ([r for r, _ in train[: args.probe]], [r for r, _, _ in held]) if args.probe else None
    probe = {"before": colour_presence_probe(model, processor, *probe_scenes, device)} if probe_scenes else {}
    if probe:
        print(json.dumps({"task": name, "probe_before": probe["before"]}), flush=True)
    optimizer = torch.optim.AdamW(parameter_groups(model, args.weight_decay, args.vision_lr_scale), lr=args.lr)
    objective, rng, curve, t0 = SFTObjective(), random.Random(0), [], time.perf_counter()
    train_losses: list[float] = []
    for step in range(args.steps + 1):
        if step % args.eval_every == 0:
            predictions = first_token_predictions(model, held_examples, device)
            generated = box_answers(model, processor, [held_examples[i] for i in boxed],
                                    [held_questions[i][1] for i in boxed], device)  # fmt: skip
            for i, (iou, text) in zip(boxed, generated):
                predictions[i] = (iou >= BOX_CORRECT_IOU, hash(text), predictions[i][2], iou)
            point = {"step": step, **summarise(predictions), "seconds": round(time.perf_counter() - t0, 1)}
            if train_losses:  # the training batches' mean loss since the last check, beside the held-out CE
                point["train_ce"] = round(sum(train_losses) / len(train_losses), 4)
                train_losses.clear()
            if len(baselines) > 1:
                point["kinds"] = {k: summarise(p) for k, p in by_kind(kinds, predictions).items()}
            curve.append(point)
            print(json.dumps({"task": name, **point}), flush=True)
        if step == args.steps:
            break
        for group in optimizer.param_groups:
            group["lr"] = args.lr * group["lr_scale"] * lr_multiplier(step, args)
        batch = [
            register(r, training_example(processor, r, question, rng, args))
            for r, question in rng.sample(train, args.batch_size)
        ]
        out = objective(model, collate_sft(batch, model.config, device))
        optimizer.zero_grad(set_to_none=True)
        loss = out.loss_sum / out.num_loss_units
        loss.backward()
        train_losses.append(loss.item())
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
    if probe:
        probe["after"] = colour_presence_probe(model, processor, *probe_scenes, device)
        print(json.dumps({"task": name, "probe_after": probe["after"]}), flush=True)
    if args.save:
        save_pretrained(model.cpu(), args.save)
        processor.save(args.save)
    blind_ce = round(sum(b["blind_ce"] * b["n"] for b in baselines.values()) / len(held), 4)  # kinds are asked apart
    return {
        "task": name,
        "majority": majority,
        "chance": 1 / len(all_answers),
        "blind_ce": blind_ce,
        "kinds": baselines,
        "curve": curve,
        "probe": probe,
    }


def format_table(results: list[dict]) -> str:
    """One row per task, and one per question kind of a task that asks several: the best and the last held-out
    accuracy, the last check's top-answer share and first-token cross-entropy beside the blind one, and for a box
    kind its last mean IoU beside the prior box's."""
    lines = ["| task | majority | chance | best held-out accuracy (step) | last | last top-answer share "
             "| last CE (blind) | last IoU (prior box) |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in results:
        rows = [(r["task"], r, lambda c: c)]
        if len(r["kinds"]) > 1:
            rows += [(f"{r['task']}/{k} (n={b['n']})", b, lambda c, k=k: c["kinds"][k]) for k, b in r["kinds"].items()]
        for label, base, point in rows:
            best = max(r["curve"], key=lambda c: point(c)["accuracy"])
            last = point(r["curve"][-1])
            blind = base.get("blind_ce", r.get("blind_ce"))
            iou = f"{last['iou']:.3f} ({base['prior_iou']:.3f})" if "prior_iou" in base and "iou" in last else "–"
            lines.append(
                f"| {label} | {base['majority']:.3f} | {base['chance']:.3f} | {point(best)['accuracy']:.3f} "
                f"({best['step']}) | {last['accuracy']:.3f} | {last['top_pred_share']:.2f} | {last['ce']:.3f} "
                f"({blind:.3f}) | {iou} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tasks", default="halves,presence,color1", help=f"comma-separated, of {sorted(TASKS)}; "
                    "a+b trains a mixture of a and b; task@framing picks that part's framing")  # fmt: skip
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--eval-every", type=int, default=50)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--vision-lr-scale", type=float, default=1.0, help="the vision tower's learning rate as a "
                    "multiple of --lr (0 freezes it)")  # fmt: skip
    ap.add_argument("--scenes", type=int, default=2000, help="training scenes per task")
    ap.add_argument("--seed", type=int, default=5000)
    ap.add_argument("--fov-deg", type=float, default=0.0, help="camera field of view (0: the generator's 60°; "
                    "22° makes objects about 12x larger in area)")  # fmt: skip
    ap.add_argument("--framing", default="default", choices=sorted(FRAMINGS), help="the generator's camera and "
                    "objects (engine.data.synth.FRAMINGS)")  # fmt: skip
    ap.add_argument("--qtypes", default="", help=f"task ask: comma-separated question kinds (default "
                    f"{','.join(ONE_WORD_QTYPES)}; scored by a box answer's IoU: "
                    f"{','.join(BOX_QTYPES)})")  # fmt: skip
    ap.add_argument("--bare", action="store_true", help="leave the SIF instruction out of the prompt: the question "
                    "stands right before the answer")  # fmt: skip
    ap.add_argument("--turns", type=int, default=1, help="questions about each training scene in one conversation "
                    "(follow-up turns; every answer scored, the first alone held out)")  # fmt: skip
    ap.add_argument("--held-out", type=int, default=HELD_OUT, help="held-out scenes per task")
    ap.add_argument("--warmup", type=int, default=30, help="steps of linear learning-rate warm-up")
    ap.add_argument("--schedule", choices=("constant", "cosine", "linear"), default="constant",
                    help="after the warm-up: a flat rate, or one decayed to --min-lr-ratio at --steps")  # fmt: skip
    ap.add_argument("--min-lr-ratio", type=float, default=0.05, help="the decayed rate's end, a multiple of --lr")
    ap.add_argument("--probe", type=int, default=0, help="before and after training, fit a linear colour-presence "
                    "probe on the pooled vision features of this many training scenes "
                    "(scored on the held-out ones)")  # fmt: skip
    ap.add_argument("--oracle-tower", action="store_true", help="replace the vision tower by the decoder's "
                    "embeddings of the words naming what each image token shows (OracleTower)")  # fmt: skip
    ap.add_argument(
        "--oracle-position",
        type=float,
        default=0.0,
        help="with --oracle-tower: add this weight x "
        "engine.train.vision_align.position_code (where each token is) to the oracle's tokens",
    )
    ap.add_argument("--rope-theta", type=float, default=0.0, help="the random tiny decoder's rotary base (0: the "
                    "default's)")  # fmt: skip
    ap.add_argument("--init", default="", help="start from this checkpoint instead of random tiny weights")
    ap.add_argument("--save", default="", help="write the trained model and processor here (the last task's)")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--data-dir", default="", help="where scenes are generated (default: a temporary folder)")
    ap.add_argument("--json", default="", help="also write the curves here")
    args = ap.parse_args(argv)
    parts = [part.partition("@") for task in args.tasks.split(",") for part in task.split("+")]
    unknown = sorted({task for task, _, _ in parts} - set(TASKS))
    unknown += sorted({f"@{framing}" for _, _, framing in parts if framing} - {f"@{f}" for f in FRAMINGS})
    if unknown:
        raise SystemExit(
            f"unknown task(s) {unknown}; expected some of {sorted(TASKS)}, each optionally @ one of {sorted(FRAMINGS)}"
        )
    if args.oracle_tower and (args.probe or args.save):
        raise SystemExit("--oracle-tower has no vision tower to probe or save; leave out --probe and --save")
    unknown = sorted(set(filter(None, args.qtypes.split(","))) - set(ONE_WORD_QTYPES + BOX_QTYPES))
    if unknown:
        raise SystemExit(f"unknown --qtypes {unknown}; expected some of {list(ONE_WORD_QTYPES + BOX_QTYPES)}")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.data_dir or tmp)
        results = [run_task(name, args, root) for name in args.tasks.split(",")]
    print(format_table(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()
