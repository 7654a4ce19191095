"""Per-token log-probabilities (and entropy) of the targets under softmax(logits / temperature).

Triton path: one program per row streams the vocabulary once with an fp32 online log-sum-exp (plus the running
sum of p·x for the entropy); the backward recomputes the softmax from the saved log-sum-exp and writes
``(onehot − p)·g/T − g_H·p·(log p + H)/T``, optionally in place into the logits buffer. Rows are addressed as
``(b, l)`` with two strides, so shifted views such as ``logits[:, :-1]`` of a ``[B, L+1, V]`` tensor need no copy.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._dispatch import check_float, check_targets, check_temperature, resolve_backend
from .online_softmax import online_softmax_row, softmax_row_grad, zero_row

# Launch defaults: the best forward + backward pair of `python -m benchmarks.kernels --device cuda --sweep`
# (bf16, N=8192, V=151936; benchmarks/results/2026-11-26b-NVIDIA_H200/README.md, section 2).
_BLOCK_V = 8192
_NUM_WARPS = 4


@triton.jit
def _logprob_fwd_kernel(
    X,
    stride_xb,
    stride_xl,
    L,
    TARGET,
    ROW_MASK,
    LOGP,
    LSE,
    ENT,
    V,
    temperature,
    HAS_ROW_MASK: tl.constexpr,
    WITH_ENTROPY: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    """Row ``pid`` of the [B*L, V] logits: logp of the target, lse and (optionally) entropy, all fp32.

    Grid (N,), one program per row. Reads the row's V logits, its target and row-mask byte; writes 8 bytes
    (logp, lse; 12 with the entropy). A masked row reads its mask byte and writes zeros.
    """
    temperature = tl.cast(temperature, tl.float32)  # stay fp32 even if a caller hands over an fp64 scalar
    row = tl.program_id(0).to(tl.int64)
    if HAS_ROW_MASK:
        if tl.load(ROW_MASK + row) == 0:
            tl.store(LOGP + row, 0.0)
            tl.store(LSE + row, 0.0)
            if WITH_ENTROPY:
                tl.store(ENT + row, 0.0)
            return
    x_row = X + (row // L) * stride_xb + (row % L) * stride_xl
    m, s, t = online_softmax_row(x_row, V, temperature, float("-inf"), 0.0, 0.0, WITH_ENTROPY, BLOCK_V, False)
    lse = m + tl.log(s)
    tgt = tl.load(TARGET + row).to(tl.int64)
    x_t = tl.load(x_row + tgt).to(tl.float32) / temperature
    tl.store(LOGP + row, x_t - lse)
    tl.store(LSE + row, lse)
    if WITH_ENTROPY:
        tl.store(ENT + row, lse - t / s)


@triton.jit
def _logprob_bwd_kernel(
    X,
    stride_xb,
    stride_xl,
    DX,
    stride_db,
    stride_dl,
    L,
    TARGET,
    ROW_MASK,
    LSE,
    ENT,
    G_LOGP,
    G_ENT,
    V,
    temperature,
    HAS_ROW_MASK: tl.constexpr,
    HAS_G_ENT: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    """d(loss)/d(logits) of row ``pid``; DX may alias X (each block is read before it is overwritten).

    Grid (N,), one program per row. Reads the row's V logits and up to 5 scalars (target, mask byte, lse, g, and
    entropy terms); writes V gradient values. A masked row reads its mask byte and writes V zeros.
    """
    temperature = tl.cast(temperature, tl.float32)
    row = tl.program_id(0).to(tl.int64)
    b = row // L
    r = row % L
    x_row = X + b * stride_xb + r * stride_xl
    d_row = DX + b * stride_db + r * stride_dl
    if HAS_ROW_MASK:
        if tl.load(ROW_MASK + row) == 0:
            zero_row(d_row, V, BLOCK_V)
            return
    lse = tl.load(LSE + row)
    g = tl.load(G_LOGP + row) / temperature
    tgt = tl.load(TARGET + row).to(tl.int64)
    g_ent = 0.0
    ent = 0.0
    if HAS_G_ENT:
        g_ent = tl.load(G_ENT + row) / temperature
        ent = tl.load(ENT + row)
    softmax_row_grad(x_row, d_row, V, tgt, lse, g, g_ent, ent, temperature, HAS_G_ENT, BLOCK_V, False, False)


def rows_view(x: torch.Tensor, target: torch.Tensor) -> tuple[int, int, int]:
    """(L, stride_b, stride_l) addressing the rows of x ([N, V] or [B, >= L, V]) as b*L + l, L = target.shape[1]."""
    if x.dim() == 2:
        return 1, x.stride(0), 0
    return target.shape[1], x.stride(0), x.stride(1)


def _launch(v: int, block_v: int | None, num_warps: int | None) -> tuple[int, int]:
    """(BLOCK_V, num_warps) for rows of ``v`` logits: the given values, else the defaults."""
    block_v = block_v or min(_BLOCK_V, triton.next_power_of_2(v))
    if block_v & (block_v - 1):
        raise ValueError(f"block_v must be a power of two, got {block_v}")
    return block_v, num_warps or _NUM_WARPS


def logprob_fwd_triton(
    logits: torch.Tensor,
    target: torch.Tensor,
    temperature: float,
    with_entropy: bool,
    row_mask: torch.Tensor | None = None,
    *,
    block_v: int | None = None,
    num_warps: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the forward kernel. logits [N, V] or [B, L', V] with L' >= L (unit stride on V; only the first L
    positions are read); target and row_mask [N] / [B, L].

    Returns fp32 (logp, lse, entropy) shaped like target; entropy is empty unless requested.
    Rows where row_mask == 0 are skipped and read as 0. ``block_v`` / ``num_warps`` override the launch
    configuration (``benchmarks.kernels --sweep`` times the alternatives).
    """
    lead = target.shape
    n, v = lead.numel(), logits.shape[-1]
    logp = torch.empty(lead, dtype=torch.float32, device=logits.device)
    lse = torch.empty_like(logp)
    ent = torch.empty_like(logp) if with_entropy else logp.new_empty(0)
    if n == 0:
        return logp, lse, ent
    rows_l, sb, sl = rows_view(logits, target)
    block_v, num_warps = _launch(v, block_v, num_warps)
    _logprob_fwd_kernel[(n,)](
        logits,
        sb,
        sl,
        rows_l,
        target.contiguous(),
        row_mask.contiguous() if row_mask is not None else logp,
        logp,
        lse,
        ent if with_entropy else logp,
        v,
        float(temperature),
        HAS_ROW_MASK=row_mask is not None,
        WITH_ENTROPY=with_entropy,
        BLOCK_V=block_v,
        num_warps=num_warps,
    )
    return logp, lse, ent


def logprob_bwd_triton(
    logits: torch.Tensor,
    target: torch.Tensor,
    lse: torch.Tensor,
    ent: torch.Tensor,
    g_logp: torch.Tensor,
    g_ent: torch.Tensor | None,
    temperature: float,
    out: torch.Tensor,
    row_mask: torch.Tensor | None = None,
    *,
    block_v: int | None = None,
    num_warps: int | None = None,
) -> torch.Tensor:
    """Write d(loss)/d(logits) into ``out`` (same shape as logits; may be logits itself) and return it.
    Positions of a [B, L', V] logits tensor past the L scored ones get a zero gradient. ``block_v`` /
    ``num_warps`` override the launch configuration, as in ``logprob_fwd_triton``."""
    n, v = lse.numel(), logits.shape[-1]
    if logits.dim() == 3 and logits.shape[1] > target.shape[1]:
        out[:, target.shape[1] :].zero_()
    if n == 0:
        return out
    rows_l, sb, sl = rows_view(logits, target)
    _, db, dl = rows_view(out, target)
    block_v, num_warps = _launch(v, block_v, num_warps)
    g_logp = g_logp.float().contiguous()
    _logprob_bwd_kernel[(n,)](
        logits,
        sb,
        sl,
        out,
        db,
        dl,
        rows_l,
        target.contiguous(),
        row_mask.contiguous() if row_mask is not None else lse,
        lse,
        ent if g_ent is not None else lse,
        g_logp,
        g_ent.float().contiguous() if g_ent is not None else g_logp,
        v,
        float(temperature),
        HAS_ROW_MASK=row_mask is not None,
        HAS_G_ENT=g_ent is not None,
        BLOCK_V=block_v,
        num_warps=num_warps,
    )
    return out


def mark_overwritten(t: torch.Tensor) -> None:
    """Bump t's version counter after a kernel wrote into it, so stale autograd uses of it raise."""
    torch.autograd.graph.increment_version(t)


class TokenLogprobsFunction(torch.autograd.Function):
    """Autograd wrapper of the Triton kernels; outputs (logp, entropy), entropy empty unless requested."""

    @staticmethod
    def forward(ctx, logits, target, temperature, with_entropy, inplace_backward, row_mask):
        if logits.stride(-1) != 1:
            logits = logits.contiguous()
        logp, lse, ent = logprob_fwd_triton(logits, target, temperature, with_entropy, row_mask)
        ctx.save_for_backward(logits, target, lse, ent, row_mask)
        ctx.temperature = temperature
        ctx.inplace_backward = inplace_backward
        ctx.set_materialize_grads(False)
        if not with_entropy:
            ctx.mark_non_differentiable(ent)
        return logp, ent

    @staticmethod
    def backward(ctx, g_logp, g_ent):
        logits, target, lse, ent, row_mask = ctx.saved_tensors
        if g_logp is None and g_ent is None:
            return None, None, None, None, None, None
        if g_logp is None:
            g_logp = torch.zeros_like(lse)
        # in place: a fresh alias (detach) of the buffer, which a leaf's AccumulateGrad adopts as .grad; the saved
        # tensor itself may be cloned there (a full copy of the logits: benchmarks/results/2026-11-26b-NVIDIA_H200)
        out = (
            logits.detach() if ctx.inplace_backward else torch.empty_like(logits, memory_format=torch.contiguous_format)
        )
        logprob_bwd_triton(logits, target, lse, ent, g_logp, g_ent, ctx.temperature, out, row_mask)
        if ctx.inplace_backward:
            mark_overwritten(logits)
        return out, None, None, None, None, None


def token_logprobs_reference(
    logits: torch.Tensor, target: torch.Tensor, temperature: float = 1.0, return_entropy: bool = False
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Plain PyTorch: fp32 log_softmax(logits / T) gathered at target (and the entropy of that softmax)."""
    x = logits.float() / temperature
    logp_all = torch.log_softmax(x, dim=-1)
    logp = logp_all.gather(-1, target.long().unsqueeze(-1)).squeeze(-1)
    if not return_entropy:
        return logp
    return logp, -(logp_all.exp() * logp_all).sum(-1)


def check_logits_inputs(logits: torch.Tensor, target: torch.Tensor, temperature: float, op: str) -> None:
    """Raise unless logits ([N, V] or [B, L, V], float) and target (logits.shape[:-1], in [0, V)) fit ``op``."""
    check_float(logits, "logits", op)
    check_temperature(temperature, op)
    if logits.dim() not in (2, 3):
        raise ValueError(f"{op}: logits must be [N, V] or [B, L, V], got shape {list(logits.shape)}")
    if tuple(target.shape) != tuple(logits.shape[:-1]):
        raise ValueError(
            f"{op}: target shape {list(target.shape)} must equal logits.shape[:-1] = {list(logits.shape[:-1])}"
        )
    check_targets(target.reshape(-1), logits.shape[:-1].numel(), logits.shape[-1], logits.device, op)


def token_logprobs(
    logits: torch.Tensor,
    target: torch.Tensor,
    temperature: float = 1.0,
    return_entropy: bool = False,
    *,
    inplace_backward: bool = False,
    backend: str | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """log softmax(logits / temperature)[target] in fp32, and optionally the entropy of that softmax.

    logits: [N, V] or [B, L, V], fp32/bf16/fp16, unit stride along V (any row strides); target: int64/int32
    with shape logits.shape[:-1] and values in [0, V). Returns fp32 tensors of shape logits.shape[:-1].

    inplace_backward=True (Triton path): the backward writes d(loss)/d(logits) into the logits buffer itself and
    returns it as the gradient, so no second N×V buffer is allocated. Precondition: nothing reads the logits after
    this op's backward (its version counter is bumped, so autograd uses of the old values raise).
    backend: "triton", "torch" (reference) or None (Triton for CUDA tensors, reference otherwise).
    """
    op = "token_logprobs"
    check_logits_inputs(logits, target, temperature, op)
    if resolve_backend(backend, logits, op) == "torch":
        return token_logprobs_reference(logits, target, temperature, return_entropy)
    logp, ent = TokenLogprobsFunction.apply(logits, target, float(temperature), return_entropy, inplace_backward, None)
    return (logp, ent) if return_entropy else logp
