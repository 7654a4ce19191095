"""The tiny default's initialisation must let it learn a question that needs two facts together.

The task is the decoder's core of every SIF question: after a constant 40-token preamble (as the chat template's
system turn is), 2–3 listed words, a separator and a query word; the answer is "yes" when the query is among the
listed words. Neither the list nor the query alone says anything about the answer. From N(0, 0.02²) weights (the
init of large checkpoints) the tiny decoder stays at chance on it for 400 steps; from the fan-in init it is
learned in about 100.
"""

import random

import torch
import torch.nn.functional as F

from engine.models.model import VLModel
from engine.models.tiny import init_weights, tiny_config

PREAMBLE = list(range(300, 340))
WORDS = list(range(100, 116))
YES, NO, SEPARATOR = 200, 201, 202


def membership_questions(rng: random.Random, n: int) -> tuple[list[list[int]], torch.Tensor]:
    """``n`` token sequences (preamble, listed words, separator, query) and their yes/no target ids int64 [n]."""
    sequences, targets = [], []
    for _ in range(n):
        listed = rng.sample(WORDS, rng.choice([2, 3]))
        inside = rng.random() < 0.5
        query = rng.choice(listed) if inside else rng.choice([w for w in WORDS if w not in listed])
        sequences.append(PREAMBLE + listed + [SEPARATOR, query])
        targets.append(YES if inside else NO)
    return sequences, torch.tensor(targets)


def last_token_logits(model: VLModel, sequences: list[list[int]]) -> torch.Tensor:
    """float32 [n, V]: the next-token logits after each sequence, all packed into one forward."""
    lengths = [len(s) for s in sequences]
    cu_seqlens = torch.tensor([0] + lengths).cumsum(0).to(torch.int32)
    positions = torch.cat([torch.arange(n) for n in lengths]).expand(3, -1)
    hidden = model(torch.tensor([t for s in sequences for t in s]), positions, cu_seqlens)
    return hidden[cu_seqlens[1:].long() - 1] @ model.lm_head_weight.T


def test_the_default_init_learns_a_two_fact_question() -> None:
    torch.manual_seed(0)
    model = VLModel(tiny_config())
    init_weights(model, seed=0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    rng = random.Random(0)
    held_sequences, held_targets = membership_questions(random.Random(1), 256)
    assert 0.4 < held_targets.eq(YES).float().mean() < 0.6  # chance is about 0.5
    for step in range(150):
        for group in optimizer.param_groups:
            group["lr"] = 1e-3 * min(1.0, (step + 1) / 20)
        sequences, targets = membership_questions(rng, 32)
        loss = F.cross_entropy(last_token_logits(model, sequences), targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        accuracy = last_token_logits(model, held_sequences).argmax(-1).eq(held_targets).float().mean().item()
    assert accuracy >= 0.9, f"held-out accuracy {accuracy:.3f} after 150 steps (chance 0.5)"


def test_fan_in_init_scales_each_matrix_by_its_fan_in() -> None:
    model = VLModel(tiny_config())
    init_weights(model, seed=0)
    for name, p in model.named_parameters():
        if p.dim() >= 2 and p.numel() >= 4096:
            expected = p.shape[1:].numel() ** -0.5
            assert abs(p.std().item() / expected - 1) < 0.1, name
