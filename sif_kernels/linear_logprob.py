"""Token log-probs (and entropy) of ``hidden @ weight.T / T`` without ever holding the N×V logits.

The logits are produced one tile ``[n_chunk, v_chunk]`` at a time by a matmul (cuBLAS with fp32 output for
bf16/fp16 inputs on CUDA; on CPU a bf16/fp16 product is rounded to its dtype before the upcast) and folded into
fp32 online log-sum-exp / entropy state per token by a Triton kernel. The backward recomputes each tile, turns it
into d(loss)/d(logits) (in place for fp32, else into one tile in the input dtype) and feeds it straight into two
matmuls: dW[v-chunk] accumulates over token chunks in an fp32 [v_chunk, H] buffer, dH accumulates over vocab
chunks in fp32 [N, H]. Extra memory: O(tile) + O(N·H), never O(N·V).

The reference (CPU) path runs the same chunked algorithm with PyTorch tile ops (vocabulary in one chunk, tokens
chunked), so its peak memory also stays far below the materialised logits.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._dispatch import check_float, check_targets, check_temperature, resolve_backend
from .online_softmax import online_softmax_row, softmax_row_grad

_BLOCK_V = 2048
# Tile budgets in fp32 elements: 64 Mi (256 MiB) on CUDA, 8 Mi (32 MiB) for the CPU reference.
_TILE_ELEMS_CUDA = 1 << 26
_TILE_ELEMS_CPU = 1 << 23
_V_CHUNK_CUDA = 8192


@triton.jit
def _tile_fwd_kernel(
    TILE,
    stride_t,
    TARGET,
    M,
    S,
    T_ACC,
    X_T,
    vc,
    v0,
    temperature,
    WITH_ENTROPY: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    """Fold row ``pid`` of an fp32 logits tile (vocab columns [v0, v0 + vc)) into the running fp32 state:
    max M, sum S of exp(x − M), sum T_ACC of exp(x − M)·x, and the target's scaled logit X_T if in the tile.

    Grid (n,), one program per tile row. Reads the row's vc fp32 logits, its target, the target's logit and
    16 bytes of state; writes 12 bytes of state (16 with the entropy).
    """
    temperature = tl.cast(temperature, tl.float32)  # stay fp32 even if a caller hands over an fp64 scalar
    row = tl.program_id(0).to(tl.int64)
    t_row = TILE + row * stride_t
    m = tl.load(M + row)
    s = tl.load(S + row)
    t = tl.load(T_ACC + row)
    m, s, t = online_softmax_row(t_row, vc, temperature, m, s, t, WITH_ENTROPY, BLOCK_V, False)
    tl.store(M + row, m)
    tl.store(S + row, s)
    if WITH_ENTROPY:
        tl.store(T_ACC + row, t)
    local = tl.load(TARGET + row).to(tl.int64) - v0
    in_tile = (local >= 0) & (local < vc)
    x_t = tl.load(t_row + tl.where(in_tile, local, 0)) / temperature
    tl.store(X_T + row, tl.where(in_tile, x_t, tl.load(X_T + row)))


@triton.jit
def _tile_bwd_kernel(
    TILE,
    stride_t,
    OUT,
    stride_o,
    TARGET,
    LSE,
    ENT,
    G_LOGP,
    G_ENT,
    vc,
    v0,
    temperature,
    HAS_G_ENT: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    """Row ``pid`` of d(loss)/d(logits) for an fp32 logits tile, written to OUT in OUT's dtype (may alias TILE).

    Grid (n,), one program per tile row. Reads the row's vc fp32 logits and up to 5 scalars (target, lse, g and
    the entropy terms); writes vc gradient values in OUT's dtype.
    """
    temperature = tl.cast(temperature, tl.float32)
    row = tl.program_id(0).to(tl.int64)
    t_row = TILE + row * stride_t
    o_row = OUT + row * stride_o
    lse = tl.load(LSE + row)
    g = tl.load(G_LOGP + row) / temperature
    local = tl.load(TARGET + row).to(tl.int64) - v0
    g_ent = 0.0
    ent = 0.0
    if HAS_G_ENT:
        g_ent = tl.load(G_ENT + row) / temperature
        ent = tl.load(ENT + row)
    softmax_row_grad(t_row, o_row, vc, local, lse, g, g_ent, ent, temperature, HAS_G_ENT, BLOCK_V, False, False)


class _TritonTiles:
    """Tile ops on CUDA tensors (or CPU tensors under TRITON_INTERPRET=1)."""

    @staticmethod
    def fold(tile, target, v0, state, temperature, with_entropy):
        m, s, t, x_t = state
        vc = tile.shape[1]
        block_v = min(_BLOCK_V, triton.next_power_of_2(vc))
        _tile_fwd_kernel[(tile.shape[0],)](
            tile,
            tile.stride(0),
            target,
            m,
            s,
            t,
            x_t,
            vc,
            v0,
            temperature,
            WITH_ENTROPY=with_entropy,
            BLOCK_V=block_v,
            num_warps=8 if block_v >= 2048 else 4,
        )

    @staticmethod
    def grad(tile, target, v0, lse, ent, g_logp, g_ent, temperature, out):
        vc = tile.shape[1]
        block_v = min(_BLOCK_V, triton.next_power_of_2(vc))
        _tile_bwd_kernel[(tile.shape[0],)](
            tile,
            tile.stride(0),
            out,
            out.stride(0),
            target,
            lse,
            ent if g_ent is not None else lse,
            g_logp,
            g_ent if g_ent is not None else g_logp,
            vc,
            v0,
            temperature,
            HAS_G_ENT=g_ent is not None,
            BLOCK_V=block_v,
            num_warps=8 if block_v >= 2048 else 4,
        )
        return out


class _TorchTiles:
    """The same tile ops in plain PyTorch (the reference path). They consume the fresh fp32 tile in place, so a
    tile costs one buffer (two when the entropy is involved) and a few streaming passes."""

    @staticmethod
    def fold(tile, target, v0, state, temperature, with_entropy):
        m, s, t, x_t = state
        x = tile if temperature == 1.0 else tile.div_(temperature)
        local = target - v0
        in_tile = (local >= 0) & (local < x.shape[1])
        picked = x.gather(1, local.clamp(0, x.shape[1] - 1).unsqueeze(1)).squeeze(1)
        x_t.copy_(torch.where(in_tile, picked, x_t))
        m_tile = x.amax(dim=1)
        y = x.sub_(m_tile.unsqueeze(1))  # x − max_tile, in place
        m_new = torch.maximum(m, m_tile)
        old_scale, tile_scale = torch.exp(m - m_new), torch.exp(m_tile - m_new)
        if with_entropy:
            e = torch.exp(y)
            # sum e^(x−M)·x = scale · (sum e^y·y + max_tile · sum e^y), with 0·(−inf) taken as 0
            ey = (e * y.clamp_(min=torch.finfo(torch.float32).min)).sum(1)
            e_sum = e.sum(1)
            t.mul_(old_scale).add_(tile_scale * (ey + m_tile * e_sum))
        else:
            e_sum = y.exp_().sum(1)
        s.mul_(old_scale).add_(tile_scale * e_sum)
        m.copy_(m_new)

    @staticmethod
    def grad(tile, target, v0, lse, ent, g_logp, g_ent, temperature, out):
        x = tile if temperature == 1.0 else tile.div_(temperature)
        logp = x.sub_(lse.unsqueeze(1))
        g = (g_logp / temperature).unsqueeze(1)
        if g_ent is None:
            d = logp.exp_().mul_(-g)  # −p·g
        else:
            p = torch.exp(logp)
            # −p·(g + g_H·(log p + H)), with p = 0 where log p = −inf
            d = logp.clamp_(min=torch.finfo(torch.float32).min).add_(ent.unsqueeze(1))
            d = d.mul_((g_ent / temperature).unsqueeze(1)).add_(g).mul_(p).neg_()
        local = target - v0
        rows = torch.nonzero((local >= 0) & (local < d.shape[1])).squeeze(1)
        d[rows, local[rows]] += g[rows, 0]
        if out.data_ptr() != d.data_ptr():
            out.copy_(d)
        return out


def _logits_tile(h: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """fp32 ``h @ w.T`` ([n, H] × [v, H] → [n, v]); bf16/fp16 inputs keep their tensor-core matmul on CUDA."""
    if h.dtype == torch.float32:
        return h @ w.T
    if h.is_cuda:
        return torch.mm(h, w.T, out_dtype=torch.float32)
    return (h @ w.T).float()


def _mm_fp32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """fp32 ``a @ b`` for same-dtype inputs (fp32 accumulate and output)."""
    if a.dtype == torch.float32:
        return a @ b
    if a.is_cuda:
        return torch.mm(a, b, out_dtype=torch.float32)
    return (a @ b).float()


def _chunks(total: int, size: int):
    return [(i, min(i + size, total)) for i in range(0, total, size)]


def _chunk_sizes(n: int, v: int, is_triton: bool, chunk_tokens: int | None, chunk_vocab: int | None):
    if is_triton:
        vc = chunk_vocab or min(v, _V_CHUNK_CUDA)
        nc = chunk_tokens or max(1, _TILE_ELEMS_CUDA // max(vc, 1))
    else:
        vc = chunk_vocab or v
        nc = chunk_tokens or max(1, _TILE_ELEMS_CPU // max(vc, 1))
    return max(1, nc), max(1, vc)


class LinearTokenLogprobsFunction(torch.autograd.Function):
    """Chunked fused linear + log-softmax gather; tile ops from ``tiles`` (_TritonTiles or _TorchTiles)."""

    @staticmethod
    def forward(ctx, hidden, weight, target, temperature, with_entropy, tiles, n_chunk, v_chunk):
        n, v = hidden.shape[0], weight.shape[0]
        f32 = dict(dtype=torch.float32, device=hidden.device)
        logp = torch.empty(n, **f32)
        lse = torch.empty(n, **f32)
        ent = torch.empty(n if with_entropy else 0, **f32)
        target = target.contiguous()
        for n0, n1 in _chunks(n, n_chunk):
            h, tgt = hidden[n0:n1], target[n0:n1]
            state = (
                torch.full((n1 - n0,), float("-inf"), **f32),
                torch.zeros(n1 - n0, **f32),
                torch.zeros(n1 - n0, **f32),
                torch.zeros(n1 - n0, **f32),
            )
            for v0, v1 in _chunks(v, v_chunk):
                tiles.fold(_logits_tile(h, weight[v0:v1]), tgt, v0, state, temperature, with_entropy)
            m, s, t, x_t = state
            lse[n0:n1] = m + torch.log(s)
            logp[n0:n1] = x_t - lse[n0:n1]
            if with_entropy:
                ent[n0:n1] = lse[n0:n1] - t / s
        ctx.save_for_backward(hidden, weight, target, lse, ent)
        ctx.params = (temperature, tiles, n_chunk, v_chunk)
        ctx.set_materialize_grads(False)
        if not with_entropy:
            ctx.mark_non_differentiable(ent)
        return logp, ent

    @staticmethod
    def backward(ctx, g_logp, g_ent):
        hidden, weight, target, lse, ent = ctx.saved_tensors
        temperature, tiles, n_chunk, v_chunk = ctx.params
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if (g_logp is None and g_ent is None) or not (need_h or need_w):
            return (None,) * 8
        n, v = hidden.shape[0], weight.shape[0]
        g_logp = torch.zeros_like(lse) if g_logp is None else g_logp.float().contiguous()
        g_ent = None if g_ent is None else g_ent.float().contiguous()
        d_hidden = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device) if need_h else None
        d_weight = torch.empty_like(weight) if need_w else None
        for v0, v1 in _chunks(v, v_chunk):
            w = weight[v0:v1]
            dw = torch.zeros(w.shape, dtype=torch.float32, device=w.device) if need_w else None
            for n0, n1 in _chunks(n, n_chunk):
                h, rows = hidden[n0:n1], slice(n0, n1)
                tile = _logits_tile(h, w)
                # fp32 inputs: the gradient overwrites the tile; otherwise it goes to a tile in the matmul dtype
                out = tile if hidden.dtype == torch.float32 else torch.empty_like(tile, dtype=hidden.dtype)
                g_ent_rows = g_ent[rows] if g_ent is not None else None
                ent_rows = ent[rows] if g_ent is not None else ent
                dz = tiles.grad(tile, target[rows], v0, lse[rows], ent_rows, g_logp[rows], g_ent_rows, temperature, out)
                if need_h:
                    d_hidden[n0:n1] += _mm_fp32(dz, w)
                if need_w:
                    dw += _mm_fp32(dz.T, h)
            if need_w:
                d_weight[v0:v1] = dw
        if need_h:
            d_hidden = d_hidden.to(hidden.dtype)
        return d_hidden, d_weight, None, None, None, None, None, None


def _check_linear_inputs(hidden, weight, target, temperature, op) -> None:
    check_float(hidden, "hidden", op)
    check_temperature(temperature, op)
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"{op}: need hidden [N, H] and weight [V, H], got {list(hidden.shape)} and {list(weight.shape)}"
        )
    if weight.dtype != hidden.dtype:
        raise TypeError(f"{op}: weight dtype {weight.dtype} differs from hidden dtype {hidden.dtype}")
    if weight.device != hidden.device:
        raise ValueError(f"{op}: weight is on {weight.device} but hidden is on {hidden.device}")
    check_targets(target, hidden.shape[0], weight.shape[0], hidden.device, op)


def _run(hidden, weight, target, temperature, return_entropy, tiles, chunk_tokens, chunk_vocab):
    n_chunk, v_chunk = _chunk_sizes(hidden.shape[0], weight.shape[0], tiles is _TritonTiles, chunk_tokens, chunk_vocab)
    logp, ent = LinearTokenLogprobsFunction.apply(
        hidden, weight, target, float(temperature), return_entropy, tiles, n_chunk, v_chunk
    )
    return (logp, ent) if return_entropy else logp


def linear_token_logprobs_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    temperature: float = 1.0,
    return_entropy: bool = False,
    *,
    chunk_tokens: int | None = None,
    chunk_vocab: int | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """PyTorch version of ``linear_token_logprobs``: same chunked algorithm with torch tile ops (tokens chunked
    so that a tile holds about 8 Mi fp32 logits, vocabulary in one chunk unless chunk_vocab is given)."""
    _check_linear_inputs(hidden, weight, target, temperature, "linear_token_logprobs_reference")
    return _run(hidden, weight, target, temperature, return_entropy, _TorchTiles, chunk_tokens, chunk_vocab)


def linear_token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    temperature: float = 1.0,
    return_entropy: bool = False,
    *,
    chunk_tokens: int | None = None,
    chunk_vocab: int | None = None,
    backend: str | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """log softmax(hidden @ weight.T / temperature)[target] in fp32 (and the entropy), never holding N×V logits.

    hidden: [N, H] and weight: [V, H], same float dtype and device; target: [N] int64/int32 in [0, V).
    Returns fp32 [N] (or ([N], [N])); differentiable w.r.t. hidden and weight (dW in weight's dtype, accumulated
    in fp32 per vocab chunk). chunk_tokens / chunk_vocab override the tile shape (defaults: 8192-column vocab
    chunks and ~64 Mi-element tiles on the Triton path; see the reference for the torch path).
    backend: "triton", "torch" or None (Triton for CUDA tensors, the chunked torch reference otherwise).
    """
    op = "linear_token_logprobs"
    _check_linear_inputs(hidden, weight, target, temperature, op)
    tiles = _TritonTiles if resolve_backend(backend, hidden, op) == "triton" else _TorchTiles
    return _run(hidden, weight, target, temperature, return_entropy, tiles, chunk_tokens, chunk_vocab)
