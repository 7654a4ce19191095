"""Shared helpers for the training-engine tests: a tiny decoder-shaped model, its objective, a 2-process launcher.

ToyVLM mirrors the protocol engine.distributed.parallelize expects (``decoder_blocks()``, ``vision_tower``) with a
few thousand parameters, dropout (so RNG state matters for resume) and a tied-free LM head.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from engine.train.trainer import ObjectiveOutput

VOCAB = 32
HIDDEN = 16


class ToyBlock(nn.Module):
    def __init__(self, hidden: int, dropout: float) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(hidden)
        self.up_proj = nn.Linear(hidden, 2 * hidden)
        self.down_proj = nn.Linear(2 * hidden, hidden)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.dropout(self.down_proj(F.gelu(self.up_proj(self.norm(x)))))


class ToyVLM(nn.Module):
    """Embedding -> blocks -> norm -> lm_head; ``vision_tower`` adds a projected 'image' feature to every token."""

    def __init__(self, num_blocks: int = 3, dropout: float = 0.0, seed: int = 0) -> None:
        super().__init__()
        gen_state = torch.get_rng_state()
        torch.manual_seed(seed)
        self.embed = nn.Embedding(VOCAB, HIDDEN)
        self.vision_tower = nn.Sequential(nn.Linear(4, HIDDEN), nn.Tanh())
        self.layers = nn.ModuleList(ToyBlock(HIDDEN, dropout) for _ in range(num_blocks))
        self.norm = nn.LayerNorm(HIDDEN)
        self.lm_head = nn.Linear(HIDDEN, VOCAB, bias=False)
        torch.set_rng_state(gen_state)

    def decoder_blocks(self) -> list[nn.Module]:
        return list(self.layers)

    def forward(self, ids: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids) + self.vision_tower(image)[:, None, :]
        for block in self.layers:
            x = block(x)
        return self.lm_head(self.norm(x))


def make_dataset(n: int = 16, seq: int = 6, seed: int = 1) -> list[dict[str, torch.Tensor]]:
    """Items with variable numbers of loss tokens (mask), so global normalisation matters."""
    gen = torch.Generator().manual_seed(seed)
    items = []
    for i in range(n):
        ids = torch.randint(0, VOCAB, (seq + 1,), generator=gen)
        mask = torch.zeros(seq, dtype=torch.bool)
        mask[: 1 + i % seq] = True
        items.append({"ids": ids, "mask": mask, "image": torch.randn(4, generator=gen)})
    return items


def collate(items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {k: torch.stack([it[k] for it in items]) for k in items[0]}


def token_ce_objective(model: nn.Module, batch: dict[str, torch.Tensor]) -> ObjectiveOutput:
    """Summed next-token cross entropy over the masked positions."""
    logits = model(batch["ids"][:, :-1], batch["image"])
    losses = F.cross_entropy(logits.flatten(0, 1), batch["ids"][:, 1:].flatten(), reduction="none")
    mask = batch["mask"].flatten()
    loss_sum = (losses * mask).sum()
    return ObjectiveOutput(loss_sum, mask.sum(), {"mean_logit": logits.detach().mean()})


def _entry(rank: int, world: int, port: int, fn: Callable, args: tuple) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank), LOCAL_RANK=str(rank)
    )
    os.environ["TORCHELASTIC_USE_AGENT_STORE"] = "True"  # the parent hosts the store: every rank is a client
    torch.set_num_threads(1)
    from engine.distributed import init_distributed

    env = init_distributed("cpu")
    try:
        fn(env, *args)
    finally:
        env.close()


def run_distributed(fn: Callable, world: int, *args: object) -> None:
    """Run ``fn(env, *args)`` on ``world`` gloo processes (spawned); raises if any rank fails.

    The parent hosts the rendezvous store, as torchrun's agent does, on a port the OS picks and keeps bound until
    the workers are done: probing for a free port and handing its number to rank 0 left a window in which another
    test's process could take it.
    """
    store = dist.TCPStore("127.0.0.1", 0, world_size=world, is_master=True, wait_for_workers=False)
    mp.start_processes(_entry, args=(world, store.port, fn, args), nprocs=world, join=True, start_method="spawn")
