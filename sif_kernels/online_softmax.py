"""Online softmax over one row of logits: the loop and the gradient formula every logits kernel here shares.

A row of logits ``x`` (scaled by 1 / temperature) is streamed once in blocks of BLOCK_V columns, keeping fp32
running state: the max ``m``, ``s = Σ exp(x − m)`` and, for the entropy, ``t = Σ exp(x − m)·x``. From it
``lse = m + log s`` and ``H = lse − t / s``. The gradient of ``g·log p[target] + g_H·H`` with respect to the
scaled logits is ``(onehot − p)·g − g_H·p·(log p + H)``; callers fold the 1 / temperature of the chain rule into
``g`` and ``g_H``. Used by ``sif_kernels/logprob.py``, ``sif_kernels/linear_logprob.py`` and
``sif_kernels/grpo_logits.py``.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def online_softmax_row(
    x_row,
    n_cols,
    temperature,
    m,
    s,
    t,
    WITH_ENTROPY: tl.constexpr,
    BLOCK_V: tl.constexpr,
    KEEP_IN_L2: tl.constexpr,
):
    """Fold ``x_row[0:n_cols] / temperature`` into the running fp32 state (m, s, t) and return the new state.

    Start from (−inf, 0, 0) for a fresh row. t is only updated WITH_ENTROPY. KEEP_IN_L2 loads with
    ``evict_last``, for callers that read the row again right after.
    """
    m = tl.cast(m, tl.float32)  # loop-carried: fp32 tensors also when the caller passes Python constants
    s = tl.cast(s, tl.float32)
    t = tl.cast(t, tl.float32)
    for start in range(0, n_cols, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        if KEEP_IN_L2:
            x = tl.load(x_row + cols, mask=cols < n_cols, other=float("-inf"), eviction_policy="evict_last")
        else:
            x = tl.load(x_row + cols, mask=cols < n_cols, other=float("-inf"))
        x = x.to(tl.float32) / temperature
        m_new = tl.maximum(m, tl.max(x, axis=0))
        alpha = tl.exp(m - m_new)
        e = tl.exp(x - m_new)
        s = s * alpha + tl.sum(e, axis=0)
        if WITH_ENTROPY:
            t = t * alpha + tl.sum(e * tl.where(e > 0.0, x, 0.0), axis=0)
        m = m_new
    return m, s, t


@triton.jit
def _row_grad_block(
    x_row,
    d_row,
    start,
    n_cols,
    target,
    lse,
    g,
    g_ent,
    ent,
    temperature,
    HAS_G_ENT: tl.constexpr,
    BLOCK_V: tl.constexpr,
    EVICT_FIRST: tl.constexpr,
):
    """The columns [start, start + BLOCK_V) of ``softmax_row_grad``."""
    cols = start + tl.arange(0, BLOCK_V)
    valid = cols < n_cols
    if EVICT_FIRST:
        x = tl.load(x_row + cols, mask=valid, other=0.0, eviction_policy="evict_first")
    else:
        x = tl.load(x_row + cols, mask=valid, other=0.0)
    logp = x.to(tl.float32) / temperature - lse
    p = tl.exp(logp)
    d = tl.where(cols == target, g, 0.0) - p * g
    if HAS_G_ENT:
        d -= g_ent * p * tl.where(p > 0.0, logp + ent, 0.0)
    if EVICT_FIRST:
        tl.store(d_row + cols, d.to(d_row.dtype.element_ty), mask=valid, eviction_policy="evict_first")
    else:
        tl.store(d_row + cols, d.to(d_row.dtype.element_ty), mask=valid)


@triton.jit
def softmax_row_grad(
    x_row,
    d_row,
    n_cols,
    target,
    lse,
    g,
    g_ent,
    ent,
    temperature,
    HAS_G_ENT: tl.constexpr,
    BLOCK_V: tl.constexpr,
    REVERSE: tl.constexpr,
    EVICT_FIRST: tl.constexpr,
):
    """d_row[j] = (1[j == target] − p_j)·g − g_ent·p_j·(log p_j + ent) for p = softmax(x_row / temperature),
    recomputed from the row's lse; the g_ent term only when HAS_G_ENT. Written in d_row's dtype; d_row may alias
    x_row (each block is read before it is overwritten). ``target`` outside [0, n_cols) adds no one-hot term.

    REVERSE walks the blocks from the end of the row (the ones a forward pass read last come first);
    EVICT_FIRST loads and stores with ``evict_first`` (the row is not needed again).
    """
    if REVERSE:
        n_blocks = tl.cdiv(n_cols, BLOCK_V)
        for i in range(0, n_blocks):
            start = (n_blocks - 1 - i) * BLOCK_V
            _row_grad_block(
                x_row, d_row, start, n_cols, target, lse, g, g_ent, ent, temperature, HAS_G_ENT, BLOCK_V, EVICT_FIRST
            )
    else:
        for start in range(0, n_cols, BLOCK_V):
            _row_grad_block(
                x_row, d_row, start, n_cols, target, lse, g, g_ent, ent, temperature, HAS_G_ENT, BLOCK_V, EVICT_FIRST
            )


@triton.jit
def zero_row(d_row, n_cols, BLOCK_V: tl.constexpr):
    """d_row[0:n_cols] = 0 (the gradient row of a masked token)."""
    for start in range(0, n_cols, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        tl.store(d_row + cols, tl.zeros([BLOCK_V], dtype=d_row.dtype.element_ty), mask=cols < n_cols)
