"""Variable-length (packed) attention over ``cu_seqlens``, without padding.

q, k, v are packed ``[T, heads, D]``; sequence i owns rows ``cu_seqlens[i]:cu_seqlens[i+1]`` and attends only to
itself (causally for the decoder, fully for vision windows/images). K/V may have fewer heads than Q (GQA).

Backends:
- ``flash_attn_varlen_func`` when flash-attn is importable and the tensors are on CUDA in fp16/bf16: one kernel,
  no padding, no mask.
- Otherwise PyTorch SDPA, **bucketed by length**: sequences of equal length are gathered into one
  ``[n, heads, L, D]`` batch and run in a single SDPA call. Nothing is padded and no ``T × T`` block-diagonal mask
  is built (whose cost would grow with the square of the *packed* length). Vision windows are nearly all the same
  size, so the vision tower needs two or three calls per block; a packed decoder batch needs one call per distinct
  length (per sequence at worst), which is the same FLOPs as ideal varlen attention.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F


@functools.cache
def _flash_attn_varlen():
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError:
        return None
    return flash_attn_varlen_func


def _buckets(cu_seqlens: torch.Tensor) -> list[tuple[int, list[int]]]:
    """Group sequence starts by length: [(length, [start, ...]), ...]; empty sequences dropped."""
    bounds = cu_seqlens.tolist()
    groups: dict[int, list[int]] = {}
    for a, b in zip(bounds[:-1], bounds[1:]):
        if b > a:
            groups.setdefault(b - a, []).append(a)
    return sorted(groups.items())


def varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    causal: bool,
    scale: float | None = None,
    max_seqlen: int | None = None,
) -> torch.Tensor:
    """Packed attention: q [T, Hq, D], k/v [T, Hkv, D], cu_seqlens int32 [B+1] → out [T, Hq, D] (q's dtype)."""
    if q.shape[0] != int(cu_seqlens[-1]):
        raise ValueError(f"varlen_attention: {q.shape[0]} tokens but cu_seqlens ends at {int(cu_seqlens[-1])}")
    flash = _flash_attn_varlen()
    if flash is not None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        cu = cu_seqlens.to(device=q.device, dtype=torch.int32)
        if max_seqlen is None:
            max_seqlen = int((cu[1:] - cu[:-1]).max())
        return flash(q, k, v, cu, cu, max_seqlen, max_seqlen, causal=causal, softmax_scale=scale)
    gqa = q.shape[1] != k.shape[1]
    out = torch.empty_like(q)
    for length, starts in _buckets(cu_seqlens):
        if len(starts) == 1:
            s = starts[0]
            qb, kb, vb = (x[s : s + length].transpose(0, 1).unsqueeze(0) for x in (q, k, v))
            ob = F.scaled_dot_product_attention(qb, kb, vb, is_causal=causal, scale=scale, enable_gqa=gqa)
            out[s : s + length] = ob[0].transpose(0, 1)
            continue
        idx = (torch.tensor(starts, device=q.device).unsqueeze(1) + torch.arange(length, device=q.device)).flatten()
        qb, kb, vb = (x.index_select(0, idx).view(len(starts), length, *x.shape[1:]).transpose(1, 2) for x in (q, k, v))
        ob = F.scaled_dot_product_attention(qb, kb, vb, is_causal=causal, scale=scale, enable_gqa=gqa)
        out.index_copy_(0, idx, ob.transpose(1, 2).reshape(-1, *q.shape[1:]))
    return out


def cached_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, mask: torch.Tensor, scale: float | None = None
) -> torch.Tensor:
    """Attention of new queries against a KV cache (generation).

    q [n, Hq, L, D], k_cache/v_cache [n, Hkv, S, D], mask bool [n, 1, L, S] (True = may attend) → [n, Hq, L, D].
    """
    gqa = q.shape[1] != k_cache.shape[1]
    return F.scaled_dot_product_attention(q, k_cache, v_cache, attn_mask=mask, scale=scale, enable_gqa=gqa)
