"""Shared helpers for the training-engine tests: a tiny decoder-shaped model, its objective, a 2-process launcher,
for the tests of the real model: a micro config, a toy record with image, depth and trace, a scripted completion;
and a clock whose sleeps take no wall time.

ToyVLM mirrors the protocol engine.distributed.parallelize expects (``decoder_blocks()``, ``vision_tower``) with a
few thousand parameters, dropout (so RNG state matters for resume) and a tied-free LM head.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from engine.data.images import save_depth, save_image
from engine.data.schema import Record, TraceStep
from engine.data.sif_format import DepthBox
from engine.models import ModelConfig, Tokenizer, tiny_config
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


def micro_config(tok: Tokenizer) -> ModelConfig:
    """The tiny default shrunk further (2 decoder layers of width 64, a 1-block vision tower): test speed only."""
    cfg = tiny_config(tok)
    cfg.text = replace(
        cfg.text,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        mrope_section=[2, 3, 3],
        head_dim=None,
    )
    cfg.vision = replace(
        cfg.vision,
        depth=1,
        hidden_size=32,
        intermediate_size=64,
        num_heads=2,
        out_hidden_size=64,
        fullatt_block_indexes=[0],
    )
    return cfg


def toy_record(tmp: Path, i: int, with_trace: bool = True) -> Record:
    """Record ``r{i}``: a seeded random 60 x 40 image and depth map written under ``tmp``, a choice question whose
    answer is "A", one ground-truth box and (``with_trace``) a two-step trace ending on that box."""
    gen = torch.Generator().manual_seed(i)
    save_image(tmp / f"{i}.png", torch.randint(0, 256, (40, 60, 3), dtype=torch.uint8, generator=gen))
    save_depth(tmp / f"{i}_d.png", torch.rand(40, 60, generator=gen))
    trace = (
        TraceStep((DepthBox(0.0, 0.0, 1.0, 1.0, 0.5),), "whole scene"),
        TraceStep((DepthBox(0.1, 0.2, 0.4, 0.6, 0.25),), "the cube"),
    )
    return Record(
        id=f"r{i}",
        image=tmp / f"{i}.png",
        question="Which is nearer? (A) cube (B) ball",
        answer="A",
        answer_type="choice",
        gt_boxes=((0.1, 0.2, 0.4, 0.6),),
        width=60,
        height=40,
        depth=tmp / f"{i}_d.png",
        trace=trace if with_trace else None,
    )


# A well-formed completion for toy_record: one area on its ground-truth box (at its stated depth), the answer "A".
SCRIPT = (
    '<think><area>[{"bbox_2d":[0.1,0.2,0.4,0.6],"depth":0.25}]</area><text>the cube</text></think><answer>A</answer>'
)


class SkewedClock:
    """A ``time.perf_counter`` stand-in (install it with monkeypatch) whose ``sleep(s)`` returns at once and moves
    the clock forward by exactly ``s``: the real clock plus every sleep so far, so it never stands still and
    timings of sleeps are exact instead of at the scheduler's mercy."""

    def __init__(self) -> None:
        self._real = time.perf_counter
        self.slept = 0.0

    def perf_counter(self) -> float:
        return self._real() + self.slept

    def sleep(self, seconds: float) -> None:
        self.slept += seconds
