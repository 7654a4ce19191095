"""The GRPO objective on packed rollouts, and the RL section of the run config.

Per micro-batch of B rollouts (G per prompt) with advantages ``A_b``:

1. one packed forward of the policy (``engine.models.packing``: no padding, M-RoPE positions per sequence);
2. hidden states at the rows predicting sampled completion tokens only (spliced crop views and the prompt are
   never scored) -> ``sif_kernels.linear_token_logprobs`` against the LM head at the sampling temperature (the [N, V]
   logits are never materialised) -> scattered to [B, L];
3. ``sif_kernels.grpo_loss`` with the clipped importance ratio against the rollout policy (``old_logp``; None when
   every batch gets one update, where the ratio is 1 by construction) and the k3 KL to the reference policy.

The Trainer divides the summed loss by the global count of loss units, so ``ObjectiveOutput`` carries
``loss · units`` and ``units``: sequences for ``grpo`` (per-sequence token mean, the release's default) and
``dr_grpo`` (÷ B·max_completion_length), tokens for ``bnpo`` and ``dapo`` (then both are the token mean over the
global batch).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn
from torch.distributed.fsdp import FSDPModule

from engine.models.packing import PackedBatch, target_logprobs
from engine.rl.rewards import RewardWeights
from engine.train.lora import lora_disabled, lora_modules
from engine.train.trainer import ObjectiveOutput
from sif_kernels import GRPOLossConfig, grpo_loss


@dataclass
class RLConfig:
    """GRPO-SIF hyper-parameters (defaults: the released Qwen2.5-VL-7B recipe).

    num_generations: G completions per prompt. beta: KL weight (0: no reference model is run).
    epsilon / epsilon_high: ratio clip range [1 − ε, 1 + ε_high]. delta: optional upper clamp of the ratio.
    loss_type / importance_level: see sif_kernels.GRPOLossConfig. scale_rewards: divide advantages by the group std
    (None: yes, except for dr_grpo). num_iterations: policy updates per generated batch (> 1 computes old log-probs).
    focus_mode: ``text`` (boxes stay text, policy sees the RGB image only, as the release) or ``crop`` (each area's
    boxes are cropped and spliced in as new views, prompt carries RGB + depth). prompt_depth_image: override the
    mode's choice of showing the colour-mapped depth image in the prompt. max_views: box views per sample
    (crop mode). crop_size: side of each view in pixels (a multiple of 28). depth_views: add the depth crop of
    each box as a second view. rewards: per-term weights and ``profile``: ``strict`` by default (the engine's rules,
    not the release's), ``release`` for the released reward code term by term (docs/rewards.md).
    judge_answer_types: answer types scored by the judge hook instead of the rules (needs a judge callable or
    judge_url). decode: how rollouts run their one-token steps (``engine.models.generate``): ``graph`` (a captured
    CUDA graph on GPU, the static step on CPU), ``graph_async`` (the same step fed from the device, the host's stop
    and trigger bookkeeping one step behind), ``static``, or ``eager`` (the model's modules, for debugging).
    rollout_prompts_per_rank: prompts per rank generated in one rollout (0: one optimiser step's,
    ``train.micro_batch_size × train.grad_accum_steps``); a multiple of that, so that one rollout feeds several
    optimiser steps (``engine.rl.step``). keep_kv_cache: keep the rollout's KV cache (and with it its CUDA graphs)
    allocated from one rollout to the next; False frees it after each rollout, for memory during the update.
    """

    num_generations: int = 8
    beta: float = 0.04
    epsilon: float = 0.2
    epsilon_high: float = 0.2
    delta: float | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    max_completion_length: int = 2048
    loss_type: Literal["grpo", "bnpo", "dr_grpo", "dapo"] = "grpo"
    importance_level: Literal["token", "sequence"] = "token"
    scale_rewards: bool | None = None
    num_iterations: int = 1
    log_ratio_clamp: float | None = 20.0
    focus_mode: Literal["text", "crop"] = "text"
    prompt_depth_image: bool | None = None
    max_views: int = 4
    crop_size: int = 112
    depth_views: bool = True
    rewards: RewardWeights = field(default_factory=RewardWeights)
    judge_answer_types: tuple[str, ...] = ()
    judge_url: str = ""
    decode: Literal["graph", "graph_async", "static", "eager"] = "graph"
    rollout_prompts_per_rank: int = 0
    keep_kv_cache: bool = True

    def __post_init__(self) -> None:
        if self.num_generations < 2:
            raise ValueError(f"rl.num_generations must be >= 2 (group-relative advantages), got {self.num_generations}")
        if self.num_iterations < 1:
            raise ValueError(f"rl.num_iterations must be >= 1, got {self.num_iterations}")
        if self.max_completion_length < 1:
            raise ValueError(f"rl.max_completion_length must be >= 1, got {self.max_completion_length}")
        if self.rollout_prompts_per_rank < 0:
            raise ValueError(f"rl.rollout_prompts_per_rank must be >= 0, got {self.rollout_prompts_per_rank}")
        if self.focus_mode == "crop" and (self.max_views < 1 or self.crop_size < 1):
            raise ValueError(f"rl: crop mode needs max_views >= 1 and crop_size >= 1, got {self}")

    @property
    def advantages_scaled(self) -> bool:
        return self.scale_rewards if self.scale_rewards is not None else self.loss_type != "dr_grpo"

    @property
    def depth_in_prompt(self) -> bool:
        return self.prompt_depth_image if self.prompt_depth_image is not None else self.focus_mode == "crop"

    def loss_config(self) -> GRPOLossConfig:
        return GRPOLossConfig(
            temperature=self.temperature,
            beta=self.beta,
            eps_low=self.epsilon,
            eps_high=self.epsilon_high,
            delta=self.delta,
            importance_level=self.importance_level,
            loss_type=self.loss_type,
            max_completion_length=self.max_completion_length,
            log_ratio_clamp=self.log_ratio_clamp,
        )


@dataclass
class GRPOMicroBatch:
    """One micro-batch of rollouts for the update.

    packed: the B sequences with their sampled completion tokens as targets; advantages float32 [B];
    old_logp / ref_logp float32 [B, L] (L = packed.mask.shape[1]) or None.
    """

    packed: PackedBatch
    advantages: torch.Tensor
    old_logp: torch.Tensor | None = None
    ref_logp: torch.Tensor | None = None

    def to(self, device: torch.device | str) -> GRPOMicroBatch:
        move = lambda t: t.to(device, non_blocking=True) if t is not None else None
        return GRPOMicroBatch(self.packed.to(device), move(self.advantages), move(self.old_logp), move(self.ref_logp))


@torch.no_grad()
def rollout_logprobs(model: nn.Module, packed: PackedBatch, temperature: float) -> torch.Tensor:
    """fp32 [B, L] log-probs of the targets under ``model`` without a graph (old or reference policy)."""
    logp = packed.scatter(target_logprobs(model, packed, temperature))
    if isinstance(model, FSDPModule):
        model.reshard()  # the head was gathered for the kernel; free it until the next forward
    return logp


@torch.no_grad()
def reference_logprobs(
    model: nn.Module, packed: PackedBatch, temperature: float, reference: nn.Module | None = None
) -> torch.Tensor:
    """Reference-policy log-probs [B, L]: a frozen ``reference`` model, else ``model`` with its LoRA adapters off."""
    if reference is not None:
        return rollout_logprobs(reference, packed, temperature)
    if not lora_modules(model):
        raise ValueError(
            "reference_logprobs: the policy has no LoRA adapters, so it cannot serve as its own reference; pass a "
            "frozen reference model (full fine-tuning) or set rl.beta = 0"
        )
    with lora_disabled(model):
        return rollout_logprobs(model, packed, temperature)


class GRPOObjective:
    """``objective(model, GRPOMicroBatch) -> ObjectiveOutput`` for engine.train.Trainer."""

    def __init__(self, cfg: RLConfig) -> None:
        self.cfg = cfg
        self.loss_cfg = cfg.loss_config()

    def __call__(self, model: nn.Module, batch: GRPOMicroBatch) -> ObjectiveOutput:
        packed = batch.packed
        if batch.ref_logp is None and self.loss_cfg.beta != 0.0:
            raise ValueError(f"GRPOObjective: rl.beta = {self.loss_cfg.beta} but the micro-batch has no ref_logp")
        logp_flat, entropy = target_logprobs(model, packed, self.cfg.temperature, return_entropy=True)
        logp = packed.scatter(logp_flat)
        loss, figures = grpo_loss(logp, batch.old_logp, batch.ref_logp, batch.advantages, packed.mask, self.loss_cfg)
        if self.loss_cfg.loss_type in ("grpo", "dr_grpo"):
            units = torch.tensor(float(packed.num_sequences), device=loss.device)
        else:
            units = packed.mask.sum().to(loss.dtype)
        metrics = {
            "kl": figures["kl"],
            "clip_fraction": figures["clip_fraction"],
            "entropy": entropy.detach().mean(),
        }
        return ObjectiveOutput(loss * units, units, metrics, num_tokens=packed.num_tokens)
