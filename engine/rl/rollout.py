"""Rollouts: G sampled completions per SIF prompt, in ``text`` or ``crop`` focusing mode.

``text``: the boxes stay text inside one generation (the release). ``crop``: a ``CropFocusHook`` is attached, so
after every ``</area>`` the named boxes of all live samples are cropped in one batched ``crop_boxes`` call and
spliced in as new views before generation continues (at most ``max_views`` per sample). Generation stops at
``</answer>``, an end-of-turn token or ``max_completion_length`` sampled tokens.

Call under ``torch.no_grad()`` with the policy's parameters gathered (``engine.distributed.unsharded``) so that
ranks can generate different lengths without collectives.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from engine.data.focus import CropFocusHook
from engine.models import Processor
from engine.models.generate import DecodeEngine, Rollout, generate
from engine.rl.grpo import RLConfig
from engine.rl.prompts import SIFPrompt

STOP_STRINGS = ("</answer>",)


@dataclass
class RolloutBatch:
    """Rollouts of P prompts, prompt-major (prompt p's G samples at ``p*G .. p*G+G-1``), and timings."""

    prompts: list[SIFPrompt]
    rollouts: list[Rollout]
    num_generations: int
    seconds: float
    focus_seconds: float = 0.0
    num_views: int = 0
    decode_stats: dict[str, int] = field(default_factory=dict)

    @property
    def texts(self) -> list[str]:
        return [r.text for r in self.rollouts]

    @property
    def prompt_index(self) -> list[int]:
        return [r.prompt_index for r in self.rollouts]

    @property
    def completion_tokens(self) -> int:
        return int(sum(int(r.completion_mask.sum()) for r in self.rollouts))

    def metrics(self) -> dict[str, float]:
        n = max(len(self.rollouts), 1)
        out = {
            "rollout/completion_tokens": self.completion_tokens / n,
            "rollout/finished": sum(r.finished for r in self.rollouts) / n,
            "rollout/tokens_per_s": self.completion_tokens / max(self.seconds, 1e-9),
        }
        steps = self.decode_stats.get("steps", 0)
        if steps:  # rows the decode step computed vs rows still live, per step (finished rows leave the batch)
            out["rollout/decode_rows"] = self.decode_stats["row_steps"] / steps
            out["rollout/live_rows"] = self.decode_stats["live_row_steps"] / steps
        if self.num_views or self.focus_seconds:
            out["rollout/views_per_sample"] = self.num_views / n
            out["rollout/focus_seconds"] = self.focus_seconds
        return out


def generate_rollouts(
    model: nn.Module,
    processor: Processor,
    prompts: Sequence[SIFPrompt],
    cfg: RLConfig,
    *,
    generator: torch.Generator | None = None,
    num_samples: int | None = None,
    engine: DecodeEngine | None = None,
) -> RolloutBatch:
    """Sample ``num_samples`` (default ``cfg.num_generations``) completions per prompt in one ``generate`` call.

    ``engine``: the run's ``DecodeEngine`` (static step, CUDA graphs and KV cache kept between rollouts; None:
    built for this call). In crop mode each row's cache reserves room for its whole view budget."""
    num_samples = num_samples or cfg.num_generations
    engine = engine if engine is not None else DecodeEngine(keep_cache=False)
    hook = None
    splice_capacity = 0
    if cfg.focus_mode == "crop":
        hook = CropFocusHook(
            [p.rgb for p in prompts],
            [p.depth for p in prompts],
            crop_size=(cfg.crop_size, cfg.crop_size),
            max_views=cfg.max_views,
            depth_views=cfg.depth_views,
        )
        splice_capacity = view_budget_tokens(processor, cfg, depth=hook.with_depth)
    start = time.perf_counter()
    rollouts = generate(
        model,
        processor,
        [p.inputs for p in prompts],
        num_samples=num_samples,
        max_new_tokens=cfg.max_completion_length,
        temperature=cfg.temperature,
        top_p=cfg.top_p,
        stop_strings=STOP_STRINGS,
        focus_hook=hook,
        max_focus_steps=cfg.max_views if hook is not None else 0,
        generator=generator,
        decode=cfg.decode,
        engine=engine,
        splice_capacity=splice_capacity,
    )
    seconds = time.perf_counter() - start
    rollouts = sorted(rollouts, key=lambda r: (r.prompt_index, r.sample_index))
    return RolloutBatch(
        prompts=list(prompts),
        rollouts=rollouts,
        num_generations=num_samples,
        seconds=seconds,
        focus_seconds=hook.seconds if hook is not None else 0.0,
        num_views=hook.num_views if hook is not None else 0,
        decode_stats=dict(engine.stats),
    )


def view_budget_tokens(processor: Processor, cfg: RLConfig, depth: bool) -> int:
    """Tokens one sample's spliced views can take at most: ``max_views`` boxes, each an RGB view (and a depth
    view), each ``<|vision_start|>``, its image pads at the processor's size for a ``crop_size`` crop, and
    ``<|vision_end|>``."""
    h, w = processor.target_size(cfg.crop_size, cfg.crop_size)
    pads = (h // processor.factor) * (w // processor.factor)
    return cfg.max_views * (2 if depth else 1) * (pads + 2)
