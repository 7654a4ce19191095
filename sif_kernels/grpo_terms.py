"""Per-token GRPO loss terms as ``@triton.jit`` helpers, shared by the per-sequence loss kernel
(``sif_kernels/grpo_loss.py``) and the row kernels of the loss from logits (``sif_kernels/grpo_logits.py``): TRL's
clipped surrogate of the importance ratio and the k3 KL to the reference policy, with their derivatives.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def clipped_surrogate(lw, adv, lo, hi, delta, clamp):
    """TRL's clipped surrogate of one importance log-weight ``lw`` (scalar or block).

    Returns (loss, dloss_dlw, c1): loss = −min(c1·A, c2·A) with c = exp(clamp(lw)), c1 = min(c, delta),
    c2 = clip(c, lo, hi); its derivative w.r.t. lw (torch.min splits the gradient evenly on ties, zero outside the
    clamp); and c1, from which the clip-fraction flags are read.
    """
    c = tl.exp(tl.minimum(tl.maximum(lw, -clamp), clamp))
    c1 = tl.minimum(c, delta)
    c2 = tl.minimum(tl.maximum(c, lo), hi)
    l1 = c1 * adv
    l2 = c2 * adv
    d1 = tl.where(c <= delta, 1.0, 0.0)
    d2 = tl.where((c >= lo) & (c <= hi), 1.0, 0.0)
    dmin = tl.where(l1 < l2, d1, tl.where(l1 > l2, d2, 0.5 * (d1 + d2)))
    inside = tl.where((lw >= -clamp) & (lw <= clamp), 1.0, 0.0)
    return -tl.minimum(l1, l2), -adv * dmin * c * inside, c1


@triton.jit
def add_k3_kl(loss, dlp, ref, lp, w, beta):
    """Add beta·kl to a token's loss and w·beta·d(kl)/d(lp) to its gradient, kl = exp(ref − lp) − (ref − lp) − 1
    (the k3 estimate of KL(policy ‖ reference)); returns (loss, dlp, kl). Scalars or blocks alike."""
    diff = ref - lp
    e = tl.exp(diff)
    kl = e - diff - 1.0
    return loss + beta * kl, dlp + w * beta * (1.0 - e), kl
