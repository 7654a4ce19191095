"""The Qwen2 decoder: GQA self-attention (q/k/v bias, no o bias), RMSNorm, SwiGLU, M-RoPE.

All layers work on packed tokens ``[T, H]``. ``Attention.forward`` runs either packed causal attention over
``cu_seqlens`` (training / scoring) or, given a :class:`KVCache`, appends the new tokens' K/V to the cache and
attends against it (generation).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import nn

from .attention import cached_attention, varlen_attention
from .config import TextConfig
from .layers import RMSNorm, SwiGLU
from .rope import apply_rope


@functools.cache
def _liger_rope():
    try:
        from liger_kernel.ops.rope import LigerRopeFunction
    except ImportError:
        return None
    return LigerRopeFunction


def rope_qk(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate packed q [T, Hq, D] and k [T, Hkv, D] by precomputed M-RoPE tables cos/sin [T, D]."""
    liger = _liger_rope() if q.is_cuda else None
    if liger is not None:
        qr, kr = liger.apply(q.unsqueeze(0).transpose(1, 2), k.unsqueeze(0).transpose(1, 2), cos, sin)
        return qr.transpose(1, 2)[0], kr.transpose(1, 2)[0]
    return apply_rope(q, cos, sin), apply_rope(k, cos, sin)


@dataclass
class CacheView:
    """Where a batch of appended tokens goes in the KV cache, built on the CPU once per step and shared by all layers.

    Every tensor (but cu_seqlens) is already on the cache's device and every index is an integer tensor, so a layer
    only launches gathers/scatters: no boolean-mask indexing of a device tensor (its result size needs a device→host
    sync) and no per-layer index arithmetic. The T packed new tokens (row by row) come from n sequences, <= L each.

    rows: int64 [n] cache row of each appending sequence. dst_rows / dst_slots: int64 [T] cache row and slot that
    each packed new token's K/V is written to. mask: bool [n, 1, L, S'] attention mask over the first S' cache slots
    (padded queries may attend everywhere; their output is discarded). row_range: (lo, hi) when rows are lo..hi-1
    in order (attention then reads a view of the cache instead of gathering its rows).
    Multi-token step (L > 1, e.g. images spliced into a sample): q_index int64 [n, L] packed index of query j of
    sequence i (padded entries point at 0); q_seq / q_pos int64 [T] sequence and query position of each packed
    token, which gather the real queries' outputs back into packed order.
    One token per row (L = 1, the common decode step): q_index / q_seq / q_pos are None, since packed order is then
    row order: q [T, Hq, D] is attended as [n, Hq, 1, D] without any gather.
    Prefill (every row starts empty): cu_seqlens int32 [n+1] (on the CPU, as varlen_attention wants it), mask None;
    attention runs packed (varlen) while K/V are written to the cache.
    """

    rows: torch.Tensor
    dst_rows: torch.Tensor
    dst_slots: torch.Tensor
    mask: torch.Tensor | None
    q_index: torch.Tensor | None = None
    q_seq: torch.Tensor | None = None
    q_pos: torch.Tensor | None = None
    cu_seqlens: torch.Tensor | None = None
    row_range: tuple[int, int] | None = None

    @property
    def one_token_per_row(self) -> bool:
        """True for the decode fast path (not prefill, every row appends exactly one token)."""
        return self.cu_seqlens is None and self.q_index is None


class KVCache:
    """Per-layer K/V tensors [N, Hkv, S, D] with per-row lengths; grows (doubling) when a row would overflow."""

    def __init__(self, num_layers: int, rows: int, heads: int, head_dim: int, capacity: int, dtype, device) -> None:
        shape = (rows, heads, capacity, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.lengths = torch.zeros(rows, dtype=torch.long)

    @property
    def capacity(self) -> int:
        return self.k[0].shape[2]

    def ensure(self, needed: int) -> None:
        """Grow every layer's slot dimension to at least ``needed``."""
        if needed <= self.capacity:
            return
        new = max(needed, 2 * self.capacity)
        pad = new - self.capacity
        self.k = [torch.nn.functional.pad(t, (0, 0, 0, pad)) for t in self.k]
        self.v = [torch.nn.functional.pad(t, (0, 0, 0, pad)) for t in self.v]

    def copy_rows(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        """Duplicate cache rows (a prompt's prefill into its G sample rows)."""
        for t in self.k + self.v:
            t[dst] = t[src]
        self.lengths[dst] = self.lengths[src]

    def plan(self, rows: torch.Tensor, counts: torch.Tensor, prefill: bool = False) -> CacheView:
        """Reserve ``counts[i]`` slots after row ``rows[i]``'s current length and build the view; lengths advance.

        ``rows`` / ``counts`` are int64 CPU tensors; all index arithmetic happens here, on the CPU, once per step.
        The packed new tokens must be ordered row by row. ``prefill`` requires empty rows and attends packed.
        """
        device = self.k[0].device
        starts = self.lengths[rows]
        ends = starts + counts
        self.ensure(int(ends.max()))
        span, max_len = int(ends.max()), int(counts.max())
        valid = torch.arange(max_len).unsqueeze(0) < counts.unsqueeze(1)  # [n, L]
        seq, pos = valid.nonzero(as_tuple=True)  # [T] each, row-major = packed order
        self.lengths[rows] = ends
        dst_rows, dst_slots = rows[seq].to(device), (starts[seq] + pos).to(device)
        if prefill:
            if bool((starts != 0).any()):
                raise ValueError("KVCache.plan: prefill into non-empty rows")
            cu = torch.nn.functional.pad(torch.cumsum(counts, 0), (1, 0)).to(torch.int32)
            return CacheView(rows.to(device), dst_rows, dst_slots, None, cu_seqlens=cu)
        slots = starts.unsqueeze(1) + torch.arange(max_len)  # [n, L]
        mask = (torch.arange(span).view(1, 1, -1) <= slots.unsqueeze(-1)) | ~valid.unsqueeze(-1)  # [n, L, S']
        lo = int(rows[0])
        consecutive = bool(torch.equal(rows, torch.arange(lo, lo + len(rows))))
        gather = (None, None, None)  # one token per row: packed order is row order
        if max_len > 1:
            q_index = torch.zeros(len(rows), max_len, dtype=torch.long)
            q_index[seq, pos] = torch.arange(len(seq))
            gather = (q_index.to(device), seq.to(device), pos.to(device))
        return CacheView(
            rows.to(device),
            dst_rows,
            dst_slots,
            mask.unsqueeze(1).to(device),
            *gather,
            row_range=(lo, lo + len(rows)) if consecutive else None,
        )


class Attention(nn.Module):
    """GQA self-attention with M-RoPE."""

    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = (
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.head_dim,
        )
        self.q_proj = nn.Linear(cfg.hidden_size, self.num_heads * self.head_dim, bias=True)
        self.k_proj = nn.Linear(cfg.hidden_size, self.num_kv_heads * self.head_dim, bias=True)
        self.v_proj = nn.Linear(cfg.hidden_size, self.num_kv_heads * self.head_dim, bias=True)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, cfg.hidden_size, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cu_seqlens: torch.Tensor | None,
        cache: tuple[torch.Tensor, torch.Tensor, CacheView] | None = None,
    ) -> torch.Tensor:
        t = x.shape[0]
        q = self.q_proj(x).view(t, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(t, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(t, self.num_kv_heads, self.head_dim)
        q, k = rope_qk(q, k, cos, sin)
        if cache is None:
            out = varlen_attention(q, k, v, cu_seqlens, causal=True)
        else:
            out = self._cached(q, k, v, *cache)
        return self.o_proj(out.reshape(t, -1))

    def _cached(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        view: CacheView,
    ) -> torch.Tensor:
        """Write packed k/v [T, Hkv, D] into the cache and attend packed q [T, Hq, D] → [T, Hq, D] (see CacheView)."""
        k_cache[view.dst_rows, :, view.dst_slots] = k.to(k_cache.dtype)  # advanced indices around a slice: [T, Hkv, D]
        v_cache[view.dst_rows, :, view.dst_slots] = v.to(v_cache.dtype)
        if view.cu_seqlens is not None:
            return varlen_attention(q, k, v, view.cu_seqlens, causal=True)
        span = view.mask.shape[-1]
        fast = view.one_token_per_row
        qb = q.unsqueeze(2) if fast else q[view.q_index].transpose(1, 2)  # [n, Hq, L, D]
        if view.row_range is not None:  # consecutive rows: attend to a view of the cache, no gather copy
            lo, hi = view.row_range
            keys, values = k_cache[lo:hi, :, :span], v_cache[lo:hi, :, :span]
        else:
            keys, values = k_cache[view.rows, :, :span], v_cache[view.rows, :, :span]
        ob = cached_attention(qb, keys, values, view.mask)
        return ob.squeeze(2) if fast else ob[view.q_seq, :, view.q_pos]  # [T, Hq, D] in packed order


class DecoderLayer(nn.Module):
    """Pre-norm block: x + attn(input_layernorm(x)); x + mlp(post_attention_layernorm(x))."""

    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.self_attn = Attention(cfg)
        self.mlp = SwiGLU(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.input_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)

    def forward(self, x, cos, sin, cu_seqlens, cache=None) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cu_seqlens, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class Decoder(nn.Module):
    """Token embedding + layers + final norm (HF's ``model.*`` / ``model.language_model.*``)."""

    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
