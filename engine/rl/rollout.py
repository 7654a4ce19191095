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
from dataclasses import dataclass

import torch
from torch import nn

from engine.models import Processor
from engine.models.generate import Rollout, generate
from engine.rl.focus import CropFocusHook
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
) -> RolloutBatch:
    """Sample ``num_samples`` (default ``cfg.num_generations``) completions per prompt in one ``generate`` call."""
    num_samples = num_samples or cfg.num_generations
    hook = None
    if cfg.focus_mode == "crop":
        hook = CropFocusHook(
            [p.rgb for p in prompts],
            [p.depth for p in prompts],
            crop_size=(cfg.crop_size, cfg.crop_size),
            max_views=cfg.max_views,
            depth_views=cfg.depth_views,
        )
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
    )
