"""How fast does the tiny decoder learn to copy? Three copy tasks, our decoder beside transformers' Qwen2 of the
same shape and init (the peer), held-out token accuracy per step.

* ``induction``: a random half repeated; the second half is scored (copy the token that followed the previous
  occurrence of the current one).
* ``names``: the SIF reading step in text: the question, the SIF instruction, then the trace's first text, whose
  object words ("Find the **blue sphere** and the **red sphere**.") are scored where the question names that object
  (not the colour an attribute or counting trace reads from the image). The question's ``the`` is followed by
  colours, directions and "the thinking process", so plain induction on ``the`` is not enough: the head must pick
  the question's objects. Questions and first texts come from ``--data`` (default: the bundled training split);
  held out: the bundled ``heldout`` split, never trained on.
* ``names-prompt``: as ``names`` inside the whole SIF prompt: the system turn and 64 background "image" tokens
  before the question, the SIF trace's opening area between the instruction and the first text.

Both models start from ``engine.models.tiny.init_weights`` (fan-in), train with AdamW (constant ``--lr`` after a
20-step warm-up) on random batches, no image input. The peer needs ``transformers``; without it only ours runs.

    python -m benchmarks.copy_learning --tasks induction,names,names-prompt --steps 400
"""

from __future__ import annotations

import argparse
import importlib.util
import random
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.common import curve_table
from engine.data import bundled_dataset_dir
from engine.data.schema import load_records
from engine.data.sif_format import SIF_INSTRUCTION
from engine.models.model import VLModel
from engine.models.packing import pack_sequences, packed_hidden
from engine.models.processor import DEFAULT_SYSTEM
from engine.models.tiny import init_weights, tiny_config, tiny_tokenizer
from engine.rl.trace_reading import part_spans

TASKS = ("induction", "names", "names-prompt")
RANDOM_IDS = (100, 400)  # ordinary BPE ids of the tiny vocabulary, no special tokens
BACKGROUND_IDS = (440, 448)  # the stand-ins of image tokens in names-prompt
RANDOM_LENGTH = 48
TEXT_OPEN, TEXT_CLOSE = "<text>", "</text>"

Example = tuple[list[int], list[bool]]  # token ids, scored flags


def induction_examples(rng: random.Random, n: int) -> list[Example]:
    """``n`` sequences of random ids whose second half repeats the first; the second half is scored."""
    half = RANDOM_LENGTH // 2
    out = []
    for _ in range(n):
        ids = [rng.randrange(*RANDOM_IDS) for _ in range(half)]
        out.append((ids + ids, [i >= half for i in range(RANDOM_LENGTH)]))
    return out


def names_examples(records_path: Path, with_prompt: bool, seed: int = 0) -> list[Example]:
    """One example per record of ``records_path`` with a trace: the tokens of its question, instruction and first
    text, the first text's ``names`` scored (``engine.rl.trace_reading.part_spans``: the object phrases the
    question names, by character span)."""
    tok = tiny_tokenizer().tok
    rng = random.Random(seed)
    records, _ = load_records(records_path, check_files="none")
    out = []
    for record in records:
        if not record.trace:
            continue
        response = record.response()
        spans = part_spans(response, record.question)
        start = response.find(TEXT_OPEN) + len(TEXT_OPEN)  # the first text; the object phrases lie inside it
        if start < len(TEXT_OPEN):
            continue
        end = response.index(TEXT_CLOSE, start)
        prefix: list[int] = []
        if with_prompt:
            image = [BACKGROUND_IDS[0] + rng.randrange(8) for _ in range(64)]  # drawn for every first text
            prefix = tok.encode(f"system\n{DEFAULT_SYSTEM}\nuser\n").ids + image
            head = f"{record.question}{SIF_INSTRUCTION}\nassistant\n" + response[:start]
        else:
            head = f"{record.question}\n"
        shift = len(head) - start
        encoding = tok.encode(head + response[start:end])
        scored = [False] * len(prefix)
        scored += [any(a < e + shift and b > s + shift for s, e in spans["names"]) for a, b in encoding.offsets]
        if any(scored) and not scored[0]:
            out.append((prefix + encoding.ids, scored))
    return out


def engine_model() -> tuple[nn.Module, Callable[[Sequence[Example]], tuple[torch.Tensor, torch.Tensor]]]:
    """Our decoder (the tiny default's, fan-in init) and a function: examples → (logits [N, V], targets [N])."""
    model = VLModel(tiny_config())
    init_weights(model, seed=0)

    def scored_logits(examples: Sequence[Example]) -> tuple[torch.Tensor, torch.Tensor]:
        packed = pack_sequences(
            [torch.tensor(ids) for ids, _ in examples], [torch.tensor(m) for _, m in examples], model.config
        )
        return packed_hidden(model, packed) @ model.lm_head_weight.T, packed.target_ids

    return model, scored_logits


def peer_model() -> tuple[nn.Module, Callable[[Sequence[Example]], tuple[torch.Tensor, torch.Tensor]]]:
    """transformers' Qwen2ForCausalLM of the tiny decoder's shape and init (needs transformers)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    text = tiny_config().text
    model = Qwen2ForCausalLM(
        Qwen2Config(
            vocab_size=text.vocab_size,
            hidden_size=text.hidden_size,
            intermediate_size=text.intermediate_size,
            num_hidden_layers=text.num_hidden_layers,
            num_attention_heads=text.num_attention_heads,
            num_key_value_heads=text.num_key_value_heads,
            rms_norm_eps=text.rms_norm_eps,
            rope_theta=text.rope_theta,
            tie_word_embeddings=True,
        )
    )
    init_weights(model, seed=0)

    def scored_logits(examples: Sequence[Example]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(ids) for ids, _ in examples)
        ids = torch.zeros(len(examples), width, dtype=torch.long)
        scored = torch.zeros(len(examples), width, dtype=torch.bool)
        attention = torch.zeros(len(examples), width, dtype=torch.long)
        for b, (row, mask) in enumerate(examples):
            ids[b, : len(row)] = torch.tensor(row)
            scored[b, : len(row)] = torch.tensor(mask)
            attention[b, : len(row)] = 1
        logits = model(input_ids=ids, attention_mask=attention).logits
        return logits[:, :-1][scored[:, 1:]], ids[scored]

    return model, scored_logits


def train(
    build: Callable[[], tuple[nn.Module, Callable]],
    draw: Callable[[random.Random, int], list[Example]],
    held_out: list[Example],
    steps: int,
    eval_every: int,
    lr: float,
    batch_size: int,
) -> list[tuple[int, float]]:
    """[(step, held-out token accuracy)] every ``eval_every`` steps and at the end."""
    torch.manual_seed(0)
    model, scored_logits = build()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    rng, curve = random.Random(0), []
    for step in range(steps + 1):
        if step % eval_every == 0 or step == steps:
            with torch.no_grad():
                hits = sum(
                    int(logits.argmax(-1).eq(targets).sum())
                    for logits, targets in (scored_logits(held_out[i : i + 64]) for i in range(0, len(held_out), 64))
                )
            curve.append((step, hits / sum(sum(m) for _, m in held_out)))
        if step == steps:
            break
        for group in optimizer.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / 20)
        logits, targets = scored_logits(draw(rng, batch_size))
        loss = F.cross_entropy(logits, targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return curve


def task_data(task: str, data: Path) -> tuple[Callable[[random.Random, int], list[Example]], list[Example]]:
    """(draw a training batch, held-out examples) of ``task``."""
    if task == "induction":
        return induction_examples, induction_examples(random.Random(1), 128)
    with_prompt = task == "names-prompt"
    train_set = names_examples(data, with_prompt)
    held_out = names_examples(bundled_dataset_dir("heldout") / "records.jsonl", with_prompt, seed=1)
    if not train_set:
        raise SystemExit(f"{data}: no record with a trace and an object named in its first text")
    return (lambda rng, n: rng.choices(train_set, k=n)), held_out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tasks", default=",".join(TASKS), help=f"comma-separated, of {list(TASKS)}")
    ap.add_argument("--data", type=Path, default=bundled_dataset_dir("train") / "records.jsonl")
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--eval-every", type=int, default=50)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--no-peer", action="store_true", help="ours only")
    args = ap.parse_args(argv)
    tasks = args.tasks.split(",")
    unknown = sorted(set(tasks) - set(TASKS))
    if unknown:
        raise SystemExit(f"unknown task(s) {unknown}; expected some of {list(TASKS)}")
    models: dict[str, Callable] = {"ours": engine_model}
    if not args.no_peer:
        if importlib.util.find_spec("transformers") is None:
            print("transformers is not importable: the peer column is left out")
        else:
            models["transformers"] = peer_model
    rows = []
    for task in tasks:
        draw, held_out = task_data(task, args.data)
        for name, build in models.items():
            t0 = time.perf_counter()
            curve = train(build, draw, held_out, args.steps, args.eval_every, args.lr, args.batch_size)
            rows.append((task, name, curve, time.perf_counter() - t0))
            print(f"{task} {name}: " + " ".join(f"{s}:{a:.2f}" for s, a in curve), flush=True)
    print(f"held-out token accuracy by step (batch {args.batch_size}, lr {args.lr:g})")
    print(curve_table(("task", "model"), rows))


if __name__ == "__main__":
    main()
