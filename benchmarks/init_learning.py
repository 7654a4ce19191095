"""Can the tiny decoder learn a question that needs two facts together? A membership task on token ids, per init.

Each sequence is an optional constant preamble (as the chat template's system turn is), 2–3 listed items, a
separator and a query; the answer is "yes" when the query is among the items. Neither the items nor the query alone
say anything about the answer, so a model that has not combined them stays at chance (0.5). Variants:

* ``plain``: no preamble; items and query are the same token ids.
* ``preamble``: a 40-token constant preamble first (the case the init decides).
* ``mapped``: the preamble, and the query of item c is another token id than the item (the model learns the map).
* ``scattered``: as ``mapped``, with the items laid over 64 "patch" tokens of 40 background ids, 4 patches each
  (the layout of an image's tokens).

The decoder is the tiny default's (``engine.models.tiny``, no vision input), trained with AdamW on the last token's
cross-entropy; the held-out accuracy is printed per init and variant.

    python -m benchmarks.init_learning --inits 0.02,fan-in --variants plain,preamble,mapped,scattered --steps 400
"""

from __future__ import annotations

import argparse
import random
import time

import torch
import torch.nn.functional as F

from benchmarks.common import curve_table
from engine.models.model import VLModel
from engine.models.packing import pack_sequences, packed_hidden
from engine.models.tiny import init_weights, tiny_config

VARIANTS = ("plain", "preamble", "mapped", "scattered")
PREAMBLE = list(range(300, 340))
ITEMS = 16
ITEM_ID, QUERY_ID, BACKGROUND_ID = 100, 400, 140
YES, NO, SEPARATOR = 200, 201, 202


def membership_questions(variant: str, rng: random.Random, n: int) -> tuple[list[list[int]], torch.Tensor]:
    """``n`` token sequences of ``variant`` and their yes/no target ids int64 [n]."""
    sequences, targets = [], []
    for _ in range(n):
        listed = rng.sample(range(ITEMS), rng.choice([2, 3]))
        inside = rng.random() < 0.5
        query = rng.choice(listed) if inside else rng.choice([i for i in range(ITEMS) if i not in listed])
        items = [ITEM_ID + i for i in listed]
        if variant == "scattered":
            patches = [BACKGROUND_ID + rng.randrange(40) for _ in range(64)]
            for item in items:
                start = rng.randrange(0, 61)
                patches[start : start + 4] = [item] * 4
            items = patches
        query_id = (ITEM_ID if variant in ("plain", "preamble") else QUERY_ID) + query
        preamble = [] if variant == "plain" else PREAMBLE
        sequences.append(preamble + items + [SEPARATOR, query_id])
        targets.append(YES if inside else NO)
    return sequences, torch.tensor(targets)


def answer_logits(model: VLModel, sequences: list[list[int]], targets: torch.Tensor) -> torch.Tensor:
    """float32 [n, V]: the logits predicting each sequence's answer ``targets[i]``, all packed into one forward
    (``engine.models.packing``: the answer appended as the one scored token of its sequence)."""
    with_answers = [torch.tensor(s + [int(t)]) for s, t in zip(sequences, targets)]
    masks = [torch.arange(len(ids)) == len(ids) - 1 for ids in with_answers]
    return packed_hidden(model, pack_sequences(with_answers, masks, model.config)) @ model.lm_head_weight.T


def train(
    std: float | None, variant: str, steps: int, eval_every: int = 50, lr: float = 1e-3, batch_size: int = 32
) -> list[tuple[int, float]]:
    """Train the tiny decoder from ``init_weights(std=std)`` (None: fan-in) on ``variant``; returns
    [(step, held-out accuracy on 256 questions)] every ``eval_every`` steps and at the end."""
    torch.manual_seed(0)
    model = VLModel(tiny_config())
    init_weights(model, seed=0, std=std)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    held_sequences, held_targets = membership_questions(variant, random.Random(1), 256)
    rng, curve = random.Random(0), []
    for step in range(steps + 1):
        if step % eval_every == 0 or step == steps:
            with torch.no_grad():
                predicted = answer_logits(model, held_sequences, held_targets).argmax(-1)
            curve.append((step, predicted.eq(held_targets).float().mean().item()))
        if step == steps:
            break
        for group in optimizer.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / 20)
        sequences, targets = membership_questions(variant, rng, batch_size)
        loss = F.cross_entropy(answer_logits(model, sequences, targets), targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return curve


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--inits", default="0.02,fan-in", help="comma-separated: a std, or fan-in")
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {list(VARIANTS)}")
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--eval-every", type=int, default=50)
    args = ap.parse_args(argv)
    unknown = sorted(set(args.variants.split(",")) - set(VARIANTS))
    if unknown:
        raise SystemExit(f"unknown variant(s) {unknown}; expected some of {list(VARIANTS)}")
    rows = []
    for init in args.inits.split(","):
        for variant in args.variants.split(","):
            t0 = time.perf_counter()
            curve = train(None if init == "fan-in" else float(init), variant, args.steps, args.eval_every)
            rows.append((init, variant, curve, time.perf_counter() - t0))
            print(f"{init} {variant}: " + " ".join(f"{s}:{a:.2f}" for s, a in curve), flush=True)
    print(curve_table(("init", "variant"), rows))


if __name__ == "__main__":
    main()
