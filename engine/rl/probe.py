"""A fixed before/after probe of a GRPO run: the same prompts, the same sampling seeds, the run's sampling settings.

The per-step reward means of a run are noisy: every step sees other prompts, with other question types. Scoring
one fixed set of prompts with the same random streams before the first and after the last step measures what the
policy learnt. Each prompt gets ``cfg.num_generations`` samples; rewards are the run's own (weights, judge), with
no answer-progress term (a probe is not a visit). Prompts are split over ranks and the sums all-reduced.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from engine.distributed import all_reduce_sum, unsharded
from engine.models import Processor
from engine.rl.grpo import RLConfig
from engine.rl.prompts import SIFPrompt
from engine.rl.rewards import REWARD_TERMS, Judge, prefetch_judge, score_completions
from engine.rl.rollout import generate_rollouts

PROBE_KEYS = tuple(f"reward/{k}" for k in (*REWARD_TERMS, "total", "accuracy"))


def probe_rewards(
    model: nn.Module,
    processor: Processor,
    prompts: Sequence[SIFPrompt],
    cfg: RLConfig,
    *,
    seed: int,
    rank: int = 0,
    world_size: int = 1,
    prompts_per_call: int = 4,
    judge: Judge | None = None,
    device: torch.device | str | None = None,
) -> dict[str, float]:
    """Mean reward terms (``PROBE_KEYS``) over ``len(prompts) × cfg.num_generations`` samples of the whole job.

    Every rank passes the same ``prompts`` and scores ``prompts[rank::world_size]``; the stream of chunk ``c`` on
    rank ``r`` is seeded by ``(seed, r, c)``, so two probes of the same policy return the same numbers.
    Call it on the sharded model (after ``parallelize``; the recipe probes ``trainer.model``): ``device`` (default:
    where the model's parameters live) is the training device, which holds the sampling generators and the tensor
    the sums are all-reduced in, as NCCL needs (a CPU tensor in an NCCL process group raises).
    """
    mine = list(prompts[rank::world_size])
    device = torch.device(device) if device is not None else next(model.parameters()).device
    sums = torch.zeros(len(PROBE_KEYS) + 1, dtype=torch.float64, device=device)
    with torch.no_grad(), unsharded(model):
        for c, start in enumerate(range(0, len(mine), prompts_per_call)):
            chunk = mine[start : start + prompts_per_call]
            generator = torch.Generator(device=device).manual_seed((seed * 65_537 + rank) * 1_000_003 + c)
            batch = generate_rollouts(model, processor, chunk, cfg, generator=generator)
            targets = [p.target for p in chunk]
            prefetch_judge(judge, batch.texts, batch.prompt_index, targets, cfg.judge_answer_types)
            rewards = score_completions(
                batch.texts,
                batch.prompt_index,
                [p.target for p in chunk],
                weights=cfg.rewards,
                judge=judge,
                judge_types=cfg.judge_answer_types,
            )
            per_sample = rewards.per_sample()
            for i, key in enumerate(PROBE_KEYS):
                sums[i] += float(per_sample[key].double().sum())
            sums[-1] += len(batch.rollouts)
    all_reduce_sum(sums)
    count = max(float(sums[-1]), 1.0)
    return {key: float(sums[i]) / count for i, key in enumerate(PROBE_KEYS)}
