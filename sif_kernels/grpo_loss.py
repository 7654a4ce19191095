"""GRPO policy loss (TRL GRPOTrainer semantics) on per-token log-probs, and fused with the log-probs from logits.

Per token (importance level ``token``) or per sequence (``sequence``, GSPO), with ``lw`` the log importance
weight ``lp − old`` or its masked sequence mean, clamped to ±log_ratio_clamp:

    c1 = exp(lw), c2 = clamp(c1, 1 − eps_low, 1 + eps_high), c1 ← min(c1, delta) when delta is set
    loss_t = −min(c1·A, c2·A) + beta·(exp(ref − lp) − (ref − lp) − 1)

aggregated as ``grpo`` (per-sequence token mean, then batch mean), ``bnpo`` (mean over all tokens), ``dr_grpo``
(÷ B·max_completion_length) or ``dapo`` (÷ num_items_in_batch, the token count of the global batch as the
caller normalises it; defaults to this batch's tokens). TRL's extra division by gradient-accumulation steps is
the caller's. Metrics follow TRL: clip fractions with the post-delta ratio (masked token mean at token level,
plain mean over sequences at sequence level) and the masked mean k3 KL.

Triton path: one program per sequence computes the loss terms, the metrics and d(loss)/d(lp) in a single
pass (two for the sequence level); hyper-parameters are runtime fp32 arguments, so no recompile per value.
``grpo_loss_from_logits`` chains the token log-prob kernel (one pass over the logits, masked rows skipped) with
this kernel (``impl="two_pass"``, the default); its backward writes the logits gradient in place by default, with
no extra N×V buffer. ``sif_kernels/grpo_logits.py`` holds the opt-in ``impl="one_pass"`` / ``"fused"`` paths.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ._dispatch import check_float, resolve_backend
from .grpo_terms import add_k3_kl, clipped_surrogate
from .logprob import TokenLogprobsFunction, check_logits_inputs, token_logprobs_reference

IMPORTANCE_LEVELS = ("token", "sequence")
LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")


@dataclass(frozen=True)
class GRPOLossConfig:
    """Hyper-parameters of the GRPO loss (TRL GRPOConfig names in brackets).

    temperature: logits are divided by it before the softmax (only used from logits) [temperature].
    beta: weight of the k3 KL to the reference policy; 0 disables it [beta].
    eps_low / eps_high: ratio clip range [1 − eps_low, 1 + eps_high] [epsilon / epsilon_high].
    delta: upper clamp of the unclipped ratio (two-sided clipping) or None [delta].
    importance_level: "token" or "sequence" (GSPO) [importance_sampling_level].
    loss_type: "grpo", "bnpo", "dr_grpo" or "dapo" [loss_type].
    max_completion_length: the dr_grpo denominator's length [max_completion_length].
    log_ratio_clamp: clamp of the log importance weight before exp (None: no clamp, as TRL).
    """

    temperature: float = 1.0
    beta: float = 0.04
    eps_low: float = 0.2
    eps_high: float = 0.2
    delta: float | None = None
    importance_level: str = "token"
    loss_type: str = "grpo"
    max_completion_length: int | None = None
    log_ratio_clamp: float | None = 20.0

    def __post_init__(self) -> None:
        if self.importance_level not in IMPORTANCE_LEVELS:
            raise ValueError(
                f"GRPOLossConfig.importance_level must be one of {IMPORTANCE_LEVELS}, got {self.importance_level!r}"
            )
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"GRPOLossConfig.loss_type must be one of {LOSS_TYPES}, got {self.loss_type!r}")
        if not self.temperature > 0:
            raise ValueError(f"GRPOLossConfig.temperature must be > 0, got {self.temperature}")
        if self.beta < 0 or self.eps_low < 0 or self.eps_high < 0:
            raise ValueError(f"GRPOLossConfig: beta, eps_low and eps_high must be >= 0, got {self}")
        if self.loss_type == "dr_grpo" and not (self.max_completion_length and self.max_completion_length > 0):
            raise ValueError("GRPOLossConfig.max_completion_length must be a positive int for loss_type='dr_grpo'")
        if self.log_ratio_clamp is not None and not self.log_ratio_clamp > 0:
            raise ValueError(f"GRPOLossConfig.log_ratio_clamp must be > 0 or None, got {self.log_ratio_clamp}")


def aggregation_scale(
    mask: torch.Tensor, cfg: GRPOLossConfig, num_items_in_batch: torch.Tensor | float | None
) -> torch.Tensor:
    """fp32 [B] factor s_b such that the loss is sum_{b,t} mask[b,t]·s_b·loss[b,t] (no host sync)."""
    b = mask.shape[0]
    if cfg.loss_type == "grpo":
        return 1.0 / (b * mask.sum(-1).clamp(min=1.0))
    if cfg.loss_type == "bnpo":
        return (1.0 / mask.sum().clamp(min=1.0)).expand(b)
    if cfg.loss_type == "dr_grpo":
        return mask.new_full((b,), 1.0 / (b * cfg.max_completion_length))
    if num_items_in_batch is None:
        return (1.0 / mask.sum().clamp(min=1.0)).expand(b)
    items = torch.as_tensor(num_items_in_batch, dtype=torch.float32, device=mask.device)
    return (1.0 / items).expand(b)


@triton.jit
def _grpo_seq_kernel(
    LP,
    OLD,
    REF,
    ADV,
    MASK,
    SCALE,
    DLP,
    LOSS_B,
    KL_B,
    LOW_B,
    HIGH_B,
    L,
    beta,
    eps_low,
    eps_high,
    delta,
    clamp,
    HAS_OLD: tl.constexpr,
    HAS_REF: tl.constexpr,
    SEQUENCE: tl.constexpr,
    BLOCK_L: tl.constexpr,
):
    """Sequence ``pid``: its weighted loss, masked KL / clip-flag sums and d(loss)/d(lp) for all its tokens.

    Grid (B,), one program per sequence. Reads L fp32 values of each of lp, mask and, when present, old and ref
    (the sequence level reads mask, lp and old a second time), plus 8 bytes (advantage, scale); writes L fp32
    values of d(loss)/d(lp) and 16 bytes (loss, kl and clip-flag sums).
    """
    # hyper-parameters stay fp32 even if a caller hands over fp64 scalars
    beta = tl.cast(beta, tl.float32)
    eps_low = tl.cast(eps_low, tl.float32)
    eps_high = tl.cast(eps_high, tl.float32)
    delta = tl.cast(delta, tl.float32)
    clamp = tl.cast(clamp, tl.float32)
    b = tl.program_id(0).to(tl.int64)
    row = b * L
    adv = tl.load(ADV + b)
    s_b = tl.load(SCALE + b)
    lo = 1.0 - eps_low
    is_neg = tl.where(adv < 0, 1.0, 0.0)
    is_pos = tl.where(adv > 0, 1.0, 0.0)
    hi = 1.0 + eps_high
    offs = tl.arange(0, BLOCK_L)
    if SEQUENCE:
        acc = tl.zeros([BLOCK_L], dtype=tl.float32)
        cnt = tl.zeros([BLOCK_L], dtype=tl.float32)
        if HAS_OLD:
            for start in range(0, L, BLOCK_L):
                cols = start + offs
                valid = cols < L
                m = tl.load(MASK + row + cols, mask=valid, other=0.0)
                lp = tl.load(LP + row + cols, mask=valid, other=0.0)
                old = tl.load(OLD + row + cols, mask=valid, other=0.0)
                acc += tl.where(m != 0.0, (lp - old) * m, 0.0)
                cnt += m
        else:
            for start in range(0, L, BLOCK_L):
                cols = start + offs
                cnt += tl.load(MASK + row + cols, mask=cols < L, other=0.0)
        n_b = tl.sum(cnt, axis=0)
        len_b = tl.maximum(n_b, 1.0)
        lw = tl.sum(acc, axis=0) / len_b
        seq_loss, dloss_dlw, c1 = clipped_surrogate(lw, adv, lo, hi, delta, clamp)
        # d/d lp[b,t] of s_b·n_b·seq_loss, through lw = sum_t (lp − old)·m / len_b
        seq_grad = s_b * n_b * dloss_dlw / len_b
        tl.store(LOW_B + b, tl.where((c1 < lo) & (adv < 0), 1.0, 0.0))
        tl.store(HIGH_B + b, tl.where((c1 > hi) & (adv > 0), 1.0, 0.0))
    loss_acc = tl.zeros([BLOCK_L], dtype=tl.float32)
    kl_acc = tl.zeros([BLOCK_L], dtype=tl.float32)
    low_acc = tl.zeros([BLOCK_L], dtype=tl.float32)
    high_acc = tl.zeros([BLOCK_L], dtype=tl.float32)
    for start in range(0, L, BLOCK_L):
        cols = start + offs
        valid = cols < L
        m = tl.load(MASK + row + cols, mask=valid, other=0.0)
        on = m != 0.0
        lp = tl.load(LP + row + cols, mask=valid, other=0.0)
        w = m * s_b
        if SEQUENCE:
            tok_loss = tl.zeros([BLOCK_L], dtype=tl.float32) + seq_loss
            dlp = seq_grad * m
        else:
            if HAS_OLD:
                lw = lp - tl.load(OLD + row + cols, mask=valid, other=0.0)
            else:
                lw = tl.zeros([BLOCK_L], dtype=tl.float32)
            tok_loss, dloss_dlw, c1 = clipped_surrogate(lw, adv, lo, hi, delta, clamp)
            dlp = w * dloss_dlw
            low_acc += tl.where(c1 < lo, m * is_neg, 0.0)
            high_acc += tl.where(c1 > hi, m * is_pos, 0.0)
        if HAS_REF:
            ref = tl.load(REF + row + cols, mask=valid, other=0.0)
            tok_loss, dlp, kl = add_k3_kl(tok_loss, dlp, ref, lp, w, beta)
            kl_acc += tl.where(on, kl * m, 0.0)
        loss_acc += tl.where(on, tok_loss * w, 0.0)
        tl.store(DLP + row + cols, tl.where(on, dlp, 0.0), mask=valid)
    tl.store(LOSS_B + b, tl.sum(loss_acc, axis=0))
    tl.store(KL_B + b, tl.sum(kl_acc, axis=0))
    if not SEQUENCE:
        tl.store(LOW_B + b, tl.sum(low_acc, axis=0))
        tl.store(HIGH_B + b, tl.sum(high_acc, axis=0))


def grpo_fwd_triton(
    logp: torch.Tensor,
    old_logp: torch.Tensor | None,
    ref_logp: torch.Tensor | None,
    advantages: torch.Tensor,
    mask_f: torch.Tensor,
    scale: torch.Tensor,
    cfg: GRPOLossConfig,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the per-sequence kernel on [B, L] log-probs (mask_f: fp32 contiguous mask, scale: [B] aggregation
    factors); returns (loss, dlp [B, L], kl_b, low_b, high_b [B]), fp32."""
    bsz, length = logp.shape
    f32 = dict(dtype=torch.float32, device=logp.device)
    dlp = torch.empty(bsz, length, **f32)
    loss_b, kl_b, low_b, high_b = (torch.zeros(bsz, **f32) for _ in range(4))
    if bsz > 0 and length > 0:
        lp = logp.float().contiguous()
        has_ref = cfg.beta != 0.0
        _grpo_seq_kernel[(bsz,)](
            lp,
            old_logp.float().contiguous() if old_logp is not None else lp,
            ref_logp.float().contiguous() if has_ref else lp,
            advantages.float().contiguous(),
            mask_f,
            scale.float().contiguous(),
            dlp,
            loss_b,
            kl_b,
            low_b,
            high_b,
            length,
            float(cfg.beta),
            float(cfg.eps_low),
            float(cfg.eps_high),
            math.inf if cfg.delta is None else float(cfg.delta),
            math.inf if cfg.log_ratio_clamp is None else float(cfg.log_ratio_clamp),
            HAS_OLD=old_logp is not None,
            HAS_REF=has_ref,
            SEQUENCE=cfg.importance_level == "sequence",
            BLOCK_L=min(1024, triton.next_power_of_2(length)),
            num_warps=4,
        )
    return loss_b.sum(), dlp, kl_b, low_b, high_b


class GRPOLossFunction(torch.autograd.Function):
    """Autograd wrapper: forward runs the kernel (which also yields d(loss)/d(lp)); backward scales it."""

    @staticmethod
    def forward(ctx, logp, old_logp, ref_logp, advantages, mask_f, scale, cfg):
        loss, dlp, kl_b, low_b, high_b = grpo_fwd_triton(logp, old_logp, ref_logp, advantages, mask_f, scale, cfg)
        ctx.save_for_backward(dlp)
        ctx.logp_dtype = logp.dtype
        ctx.mark_non_differentiable(kl_b, low_b, high_b)
        return loss, kl_b, low_b, high_b

    @staticmethod
    def backward(ctx, g_loss, *_):
        (dlp,) = ctx.saved_tensors
        return (dlp * g_loss).to(ctx.logp_dtype), None, None, None, None, None, None


def metrics_from_sums(
    kl_b: torch.Tensor, low_b: torch.Tensor, high_b: torch.Tensor, mask_f: torch.Tensor, cfg: GRPOLossConfig
) -> dict[str, torch.Tensor]:
    """TRL's metrics from per-sequence sums ([B]: masked KL, low / high clip flags) and the fp32 mask [B, L]."""
    tokens = mask_f.sum().clamp(min=1.0)
    if cfg.importance_level == "sequence":
        low, high = low_b.mean(), high_b.mean()
    else:
        low, high = low_b.sum() / tokens, high_b.sum() / tokens
    # low clipping needs A < 0 and high clipping A > 0, so the two never overlap
    return {"clip_fraction": low + high, "clip_low": low, "clip_high": high, "kl": kl_b.sum() / tokens}


def grpo_loss_reference(
    logp: torch.Tensor,
    old_logp: torch.Tensor | None,
    ref_logp: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    cfg: GRPOLossConfig,
    num_items_in_batch: torch.Tensor | float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Plain PyTorch GRPO loss with TRL's formulas (see the module docstring); fp32 throughout."""
    m = mask.float()
    lp = logp.float()
    old = lp.detach() if old_logp is None else old_logp.float()
    log_w = lp - old
    if cfg.importance_level == "sequence":
        log_w = ((log_w * m).sum(-1) / m.sum(-1).clamp(min=1.0)).unsqueeze(-1)
    if cfg.log_ratio_clamp is not None:
        log_w = log_w.clamp(-cfg.log_ratio_clamp, cfg.log_ratio_clamp)
    coef_1 = torch.exp(log_w)
    coef_2 = torch.clamp(coef_1, 1 - cfg.eps_low, 1 + cfg.eps_high)
    if cfg.delta is not None:
        coef_1 = torch.clamp(coef_1, max=cfg.delta)
    adv = advantages.float().unsqueeze(1)
    per_token = -torch.min(coef_1 * adv, coef_2 * adv)
    kl = None
    if cfg.beta != 0.0:
        diff = ref_logp.float() - lp
        kl = torch.exp(diff) - diff - 1
        per_token = per_token + cfg.beta * kl
    scale = aggregation_scale(m, cfg, num_items_in_batch)
    loss = (per_token * m * scale.unsqueeze(1)).sum()
    with torch.no_grad():
        low = ((coef_1 < 1 - cfg.eps_low) & (adv < 0)).float()
        high = ((coef_1 > 1 + cfg.eps_high) & (adv > 0)).float()
        if cfg.importance_level == "sequence":
            low_b, high_b = low.squeeze(1), high.squeeze(1)
        else:
            low_b, high_b = (low * m).sum(-1), (high * m).sum(-1)
        kl_b = (kl * m).sum(-1) if kl is not None else torch.zeros_like(low_b)
        metrics = metrics_from_sums(kl_b, low_b, high_b, m, cfg)
    return loss, metrics


def _check_grpo_inputs(logp, old_logp, ref_logp, advantages, mask, cfg, op) -> None:
    check_float(logp, "logp", op)
    if logp.dim() != 2:
        raise ValueError(f"{op}: logp must be [B, L], got shape {list(logp.shape)}")
    shape = tuple(logp.shape)
    for name, t in (("old_logp", old_logp), ("ref_logp", ref_logp), ("mask", mask)):
        if t is None:
            continue
        if tuple(t.shape) != shape:
            raise ValueError(f"{op}: {name} shape {list(t.shape)} must equal logp shape {list(shape)}")
        if t.device != logp.device:
            raise ValueError(f"{op}: {name} is on {t.device} but logp is on {logp.device}")
    if tuple(advantages.shape) != shape[:1]:
        raise ValueError(f"{op}: advantages must be [B] = [{shape[0]}], got {list(advantages.shape)}")
    if advantages.device != logp.device:
        raise ValueError(f"{op}: advantages is on {advantages.device} but logp is on {logp.device}")
    if cfg.beta != 0.0 and ref_logp is None:
        raise ValueError(f"{op}: cfg.beta = {cfg.beta} needs ref_logp (or set beta=0)")


def grpo_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor | None,
    ref_logp: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    cfg: GRPOLossConfig,
    num_items_in_batch: torch.Tensor | float | None = None,
    *,
    backend: str | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GRPO loss on per-token log-probs; differentiable w.r.t. logp.

    logp, old_logp, ref_logp: [B, L] float (old None: the ratio is 1, as TRL with old = logp.detach(); ref may be
    None when cfg.beta == 0); advantages: [B]; mask: [B, L] bool/int/float (multiplicative weights, as TRL).
    Returns (fp32 scalar loss, metrics): clip_fraction, clip_low, clip_high, kl (0 when beta == 0), all 0-dim
    fp32 tensors (no host sync).
    """
    op = "grpo_loss"
    _check_grpo_inputs(logp, old_logp, ref_logp, advantages, mask, cfg, op)
    if resolve_backend(backend, logp, op) == "torch":
        return grpo_loss_reference(logp, old_logp, ref_logp, advantages, mask, cfg, num_items_in_batch)
    mask_f = mask.float().contiguous()
    scale = aggregation_scale(mask_f, cfg, num_items_in_batch)
    ref = ref_logp if cfg.beta != 0.0 else None
    loss, kl_b, low_b, high_b = GRPOLossFunction.apply(logp, old_logp, ref, advantages, mask_f, scale, cfg)
    return loss, metrics_from_sums(kl_b, low_b, high_b, mask_f, cfg)


def grpo_loss_from_logits(
    logits: torch.Tensor,
    completion_ids: torch.Tensor,
    old_logp: torch.Tensor | None,
    ref_logp: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    cfg: GRPOLossConfig,
    num_items_in_batch: torch.Tensor | float | None = None,
    *,
    inplace_backward: bool = True,
    impl: str = "two_pass",
    backend: str | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GRPO loss straight from logits, with log-probs at cfg.temperature. Other arguments as ``grpo_loss``.

    logits: [B, L, V] scoring completion_ids[b, t] at logits[b, t] (rows may be strided, e.g. a slice), or
    [B, L + 1, V], the model's logits including the position after the last token, which is ignored. Pass the
    latter rather than ``logits[:, :-1]`` when the logits require grad: the gradient then lands in the logits'
    own buffer (its last position zeroed) instead of a fresh tensor allocated by the slice's backward.

    Triton path: one read of the logits in the forward (rows with mask == 0 are skipped); the backward writes
    d(loss)/d(logits) into the logits buffer when inplace_backward (default; the caller must not need the logits
    afterwards, see ``token_logprobs``), so no N×V buffer beyond the logits exists.

    impl (Triton path): "two_pass" (default, the measured path: token log-prob kernel, then the per-sequence loss
    kernel), "one_pass" (one forward kernel computes log-probs, loss terms and d(loss)/d(logp) per token; one
    backward kernel) or "fused" (token level: the forward kernel also writes the logits gradient, for an upstream
    gradient of 1, which the backward rescales when it is not 1; the logits are then overwritten at the forward,
    not the backward; sequence level: as "one_pass"). See ``sif_kernels/grpo_logits.py``; the last two are not yet
    timed on a GPU, so they are opt-in.
    """
    op = "grpo_loss_from_logits"
    from .grpo_logits import IMPLS  # a cycle at module level: grpo_logits imports this module

    if impl not in IMPLS:
        raise ValueError(f"{op}: impl must be one of {IMPLS}, got {impl!r}")
    if logits.dim() != 3 or completion_ids.dim() != 2:
        raise ValueError(
            f"{op}: need logits [B, L(+1), V] and completion_ids [B, L], got {list(logits.shape)} "
            f"and {list(completion_ids.shape)}"
        )
    length = completion_ids.shape[1]
    if logits.shape[1] not in (length, length + 1):
        raise ValueError(f"{op}: logits.shape[1] = {logits.shape[1]} must be L or L + 1 with L = {length}")
    scored = logits[:, :length]
    check_logits_inputs(scored, completion_ids, cfg.temperature, op)
    _check_grpo_inputs(scored.new_empty(scored.shape[:2]), old_logp, ref_logp, advantages, mask, cfg, op)
    if resolve_backend(backend, logits, op) == "torch":
        logp = token_logprobs_reference(scored, completion_ids, cfg.temperature)
        return grpo_loss_reference(logp, old_logp, ref_logp, advantages, mask, cfg, num_items_in_batch)
    if impl != "two_pass":
        from .grpo_logits import grpo_from_logits_triton

        mask_f = mask.float().contiguous()
        scale = aggregation_scale(mask_f, cfg, num_items_in_batch)
        return grpo_from_logits_triton(
            logits, completion_ids, old_logp, ref_logp, advantages, mask_f, scale, cfg, impl, inplace_backward
        )
    row_mask = (mask != 0).to(torch.int8)
    logp, _ = TokenLogprobsFunction.apply(
        logits, completion_ids, float(cfg.temperature), False, inplace_backward, row_mask
    )
    return grpo_loss(logp, old_logp, ref_logp, advantages, mask, cfg, num_items_in_batch, backend="triton")
