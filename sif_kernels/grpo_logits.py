"""GRPO loss from logits in one pass over the logits per direction (``impl="one_pass"``) or in one kernel for
forward and backward together (``impl="fused"``); ``grpo_loss_from_logits(..., impl=...)`` selects them.

Why: the default path (``impl="two_pass"``) runs the token log-prob kernel, then the per-sequence loss kernel
and some glue in the forward, and the log-prob backward kernel in the backward; it is slower than Liger's
``triton_grpo_loss``, whose forward is one kernel (benchmarks/results/2026-11-26b-NVIDIA_H200/README.md).

``one_pass``: one program per row (token) of the logits streams the vocabulary once (online log-sum-exp), and at
the token importance level evaluates the clipped surrogate, the k3 KL, the clip flags and d(loss)/d(logp) of its
token right there, so the forward is one kernel. It leaves per-token [B, L] vectors (lse, d(loss)/d(logp) and
the four loss/metric terms, reduced by one ``sum``); the backward is one kernel that reads the upstream
gradient from device memory and writes d(loss)/d(logits) in place into the logits buffer (or a fresh one). At
the sequence level (GSPO) a token's gradient depends on every token of its sequence, so the forward is the row
kernel (log-probs only) plus the existing per-sequence kernel of ``grpo_loss``.

``fused`` (token level; sequence level falls back to ``one_pass``): when the logits require grad, the forward
kernel also writes the gradient, taking the loss's upstream gradient to be 1: pass 1 over a row finds its
log-sum-exp (loads kept in L2 with ``evict_last``), pass 2 walks the row backwards (most recently read blocks
first, ``evict_first``) and writes ``(onehot − p)·dlogp/T``. With a persistent grid of a few programs per SM the
rows in flight (programs × V × 2 bytes, about 40 MB at one program per SM) fit the H200's L2, so the second read
should come from L2 and HBM traffic drop from 3 to about 2 passes over the logits. The backward then launches a
kernel that reads the upstream gradient g and returns at once when g == 1 (the usual ``loss.backward()``), and
otherwise rescales the gradient rows in place (one more read and write). Preconditions, beyond those of the
in-place backward: nothing may read the logits after this op's *forward* (their version counter is bumped, so
autograd uses of them raise) and the backward runs once.

Neither variant has been timed on a GPU yet: the default stays ``two_pass``; ``benchmarks.kernels`` times both
beside Liger and the copy bound (``--sweep-grpo`` sweeps their launch configurations), via
``benchmarks/run_gpu.sh ... grpo``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .grpo_loss import GRPOLossConfig, grpo_fwd_triton, metrics_from_sums
from .grpo_terms import add_k3_kl, clipped_surrogate
from .logprob import mark_overwritten, rows_view
from .online_softmax import online_softmax_row, softmax_row_grad, zero_row

IMPLS = ("two_pass", "one_pass", "fused")


@dataclass(frozen=True)
class LogitsLaunch:
    """Launch configuration of one of this module's kernels.

    block_v: columns per block (power of two); num_warps / num_stages: Triton's (num_stages None: its default);
    programs_per_sm: 0 launches one program per row, k > 0 a persistent grid of k programs per SM, each looping
    over rows (bounds the rows in flight, which the fused kernel's L2 reuse needs).
    """

    block_v: int
    num_warps: int
    num_stages: int | None = None
    programs_per_sm: int = 0

    def __post_init__(self) -> None:
        if self.block_v <= 0 or self.block_v & (self.block_v - 1):
            raise ValueError(f"LogitsLaunch.block_v must be a power of two, got {self.block_v}")
        if self.num_warps <= 0 or self.programs_per_sm < 0:
            raise ValueError(f"LogitsLaunch: bad num_warps / programs_per_sm in {self}")


# Defaults before any GPU run of these kernels. Forward: Liger's forward configuration (2048 columns, 1 warp,
# 2 stages, one program per row), close to the copy bound in our own benchmark
# (benchmarks/results/2026-11-26b-NVIDIA_H200/kernels-3-after-grad-alias-fix.json). Backward: logprob.py's
# swept default (8192 x 4 warps). Fused: a guess. One 16-warp program per SM keeps
# 132 rows x 304 KB (bf16, V = 151 936) = 40 MB in flight, inside the L2, with 32 KB of loads in flight per SM
# (16384 columns) for the HBM latency; `python -m benchmarks.kernels --sweep-grpo` times the alternatives.
FWD_LAUNCH = LogitsLaunch(block_v=2048, num_warps=1, num_stages=2)
BWD_LAUNCH = LogitsLaunch(block_v=8192, num_warps=4)
FUSED_LAUNCH = LogitsLaunch(block_v=16384, num_warps=16, programs_per_sm=1)
SCALE_LAUNCH = LogitsLaunch(block_v=4096, num_warps=8, programs_per_sm=4)


@triton.jit
def _grpo_logits_fwd_kernel(
    X,
    stride_xb,
    stride_xl,
    DX,
    stride_db,
    stride_dl,
    L,
    N,
    V,
    ITERS,
    TARGET,
    MASK,
    ADV,
    SCALE,
    OLD,
    REF,
    LOGP,
    LSE,
    DLP,
    TOK,
    temperature,
    beta,
    eps_low,
    eps_high,
    delta,
    clamp,
    HAS_OLD: tl.constexpr,
    HAS_REF: tl.constexpr,
    TOKEN_LOSS: tl.constexpr,
    WRITE_GRAD: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    """Rows pid, pid + P, ... (ITERS of them, P programs) of the [N = B·L, V] logits: lse and, by level, logp
    (sequence: LOGP) or the GRPO terms of the row's token (token: DLP = d(loss)/d(logp) and TOK[0..3] =
    w·loss, m·kl, m·low-clip, m·high-clip, w = mask·scale_b); WRITE_GRAD (token level) then also writes the
    row's d(loss)/d(logits) for an upstream gradient of 1 into DX (may alias X). Rows with mask == 0 read no
    logits, give zeros and (WRITE_GRAD) a zero gradient row.

    Grid: (P,), P = N (one row each) or a persistent few per SM. Per live row: reads V logits (twice with
    WRITE_GRAD, the second time meant to hit L2) + 7 scalars, writes V gradient values (WRITE_GRAD) + 6 fp32
    scalars; a masked row reads 1 scalar and writes V zeros (WRITE_GRAD) + 6 scalars.
    """
    # hyper-parameters stay fp32 even if a caller hands over fp64 scalars
    temperature = tl.cast(temperature, tl.float32)
    beta = tl.cast(beta, tl.float32)
    eps_low = tl.cast(eps_low, tl.float32)
    eps_high = tl.cast(eps_high, tl.float32)
    delta = tl.cast(delta, tl.float32)
    clamp = tl.cast(clamp, tl.float32)
    lo = 1.0 - eps_low
    hi = 1.0 + eps_high
    pid = tl.program_id(0).to(tl.int64)  # < N: the host launches at most N programs
    nprog = tl.num_programs(0)
    m_next = tl.load(MASK + pid)
    for it in range(0, ITERS):
        row = pid + it * nprog
        m = m_next
        m_next = tl.load(MASK + row + nprog, mask=row + nprog < N, other=0.0)  # the next row's, ahead of time
        if row < N:
            b = row // L
            x_row = X + b * stride_xb + (row % L) * stride_xl
            d_row = DX + b * stride_db + (row % L) * stride_dl
            if m != 0.0:
                # the row's scalars first: their latency hides behind the pass over the row
                tgt = tl.load(TARGET + row).to(tl.int64)
                x_t = tl.load(x_row + tgt).to(tl.float32)
                if TOKEN_LOSS:
                    adv = tl.load(ADV + b)
                    w = m * tl.load(SCALE + b)
                    if HAS_OLD:
                        old = tl.load(OLD + row)
                    if HAS_REF:
                        ref = tl.load(REF + row)
                m_row, s_row, _ = online_softmax_row(
                    x_row, V, temperature, float("-inf"), 0.0, 0.0, False, BLOCK_V, WRITE_GRAD
                )
                lse = m_row + tl.log(s_row)
                lp = x_t / temperature - lse
                tl.store(LSE + row, lse)
                if TOKEN_LOSS:
                    if HAS_OLD:
                        lw = lp - old
                    else:
                        lw = lp * 0.0  # on-policy: ratio exp(lp − lp.detach()) = 1, gradient 1
                    tok_loss, dloss_dlw, c1 = clipped_surrogate(lw, adv, lo, hi, delta, clamp)
                    dlp = w * dloss_dlw
                    kl = 0.0
                    if HAS_REF:
                        tok_loss, dlp, kl = add_k3_kl(tok_loss, dlp, ref, lp, w, beta)
                    tl.store(DLP + row, dlp)
                    tl.store(TOK + row, tok_loss * w)
                    tl.store(TOK + N + row, kl * m)
                    tl.store(TOK + 2 * N + row, tl.where((c1 < lo) & (adv < 0), m, 0.0))
                    tl.store(TOK + 3 * N + row, tl.where((c1 > hi) & (adv > 0), m, 0.0))
                    if WRITE_GRAD:
                        coef = dlp / temperature
                        softmax_row_grad(
                            x_row, d_row, V, tgt, lse, coef, 0.0, 0.0, temperature, False, BLOCK_V, True, True
                        )
                else:
                    tl.store(LOGP + row, lp)
            else:
                tl.store(LSE + row, 0.0)
                if TOKEN_LOSS:
                    tl.store(DLP + row, 0.0)
                    for k in range(0, 4):
                        tl.store(TOK + k * N + row, 0.0)
                    if WRITE_GRAD:
                        zero_row(d_row, V, BLOCK_V)
                else:
                    tl.store(LOGP + row, 0.0)


@triton.jit
def _grpo_logits_bwd_kernel(
    X,
    stride_xb,
    stride_xl,
    DX,
    stride_db,
    stride_dl,
    L,
    N,
    V,
    ITERS,
    TARGET,
    MASK,
    LSE,
    DLP,
    G,
    temperature,
    BLOCK_V: tl.constexpr,
):
    """d(loss)/d(logits) = (onehot − p)·DLP·g/T for rows pid, pid + P, ...; g = *G, the loss's upstream gradient
    (read on the device: no host sync). DX may alias X. Rows with mask == 0 get zeros without reading X.

    Grid: (P,), P = N or a persistent few per SM. Per live row: reads V logits + 5 scalars, writes V gradient
    values; per masked row: reads 1 scalar, writes V zeros.
    """
    temperature = tl.cast(temperature, tl.float32)
    g = tl.load(G).to(tl.float32)
    pid = tl.program_id(0).to(tl.int64)
    nprog = tl.num_programs(0)
    for it in range(0, ITERS):
        row = pid + it * nprog
        if row < N:
            b = row // L
            x_row = X + b * stride_xb + (row % L) * stride_xl
            d_row = DX + b * stride_db + (row % L) * stride_dl
            if tl.load(MASK + row) != 0.0:
                coef = tl.load(DLP + row) * g / temperature
                tgt = tl.load(TARGET + row).to(tl.int64)
                lse = tl.load(LSE + row)
                softmax_row_grad(x_row, d_row, V, tgt, lse, coef, 0.0, 0.0, temperature, False, BLOCK_V, False, True)
            else:
                zero_row(d_row, V, BLOCK_V)


@triton.jit
def _scale_grad_kernel(DX, stride_db, stride_dl, L, N, V, ITERS, MASK, G, BLOCK_V: tl.constexpr):
    """DX[row] *= g for the live rows (mask != 0) when g = *G differs from 1; returns at once when g == 1.

    Grid: (P,), a persistent few programs per SM. Reads 1 scalar per program when g == 1; otherwise per live
    row reads and writes V gradient values (masked rows, whose gradient is 0, are skipped).
    """
    g = tl.load(G).to(tl.float32)
    if g != 1.0:
        pid = tl.program_id(0).to(tl.int64)
        nprog = tl.num_programs(0)
        for it in range(0, ITERS):
            row = pid + it * nprog
            if row < N:
                if tl.load(MASK + row) != 0.0:
                    d_row = DX + (row // L) * stride_db + (row % L) * stride_dl
                    for start in range(0, V, BLOCK_V):
                        cols = start + tl.arange(0, BLOCK_V)
                        valid = cols < V
                        d = tl.load(d_row + cols, mask=valid, other=0.0).to(tl.float32) * g
                        tl.store(d_row + cols, d.to(DX.dtype.element_ty), mask=valid)


def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 2  # the interpreter (CPU tensors): a small persistent grid, so the row loops are exercised


def _grid(n: int, launch: LogitsLaunch, device: torch.device) -> tuple[int, int]:
    """(programs, rows per program) for n rows."""
    programs = n if launch.programs_per_sm == 0 else max(1, min(n, launch.programs_per_sm * _sm_count(device)))
    return programs, triton.cdiv(n, programs)


def _launch_kwargs(launch: LogitsLaunch, v: int) -> dict:
    kwargs = {"BLOCK_V": min(launch.block_v, triton.next_power_of_2(v)), "num_warps": launch.num_warps}
    if launch.num_stages is not None:
        kwargs["num_stages"] = launch.num_stages
    return kwargs


def _row_fwd(logits, ids, old, ref, adv, mask_f, scale, cfg, out, launch):
    """Launch the forward row kernel. out: the gradient buffer (fused, token level) or None.

    Returns (lse [N], logp [N] or None, dlp [N] or None, tok [4, B, L] or None), fp32.
    """
    bsz, length = ids.shape
    n, v = ids.numel(), logits.shape[-1]
    token = cfg.importance_level == "token"
    f32 = dict(dtype=torch.float32, device=logits.device)
    lse = torch.empty(n, **f32)
    logp = None if token else torch.empty(n, **f32)
    dlp = torch.empty(n, **f32) if token else None
    tok = torch.empty(4, bsz, length, **f32) if token else None
    if n == 0:
        return lse, logp, dlp, tok
    rows_l, sb, sl = rows_view(logits, ids)
    _, db, dl = rows_view(out, ids) if out is not None else (0, 0, 0)
    programs, iters = _grid(n, launch, logits.device)
    has_ref = cfg.beta != 0.0
    _grpo_logits_fwd_kernel[(programs,)](
        logits,
        sb,
        sl,
        out if out is not None else logits,
        db,
        dl,
        rows_l,
        n,
        v,
        iters,
        ids.contiguous(),
        mask_f,
        adv.float().contiguous(),
        scale.float().contiguous(),
        old.float().contiguous() if old is not None else lse,
        ref.float().contiguous() if has_ref else lse,
        logp if logp is not None else lse,
        lse,
        dlp if dlp is not None else lse,
        tok if tok is not None else lse,
        float(cfg.temperature),
        float(cfg.beta),
        float(cfg.eps_low),
        float(cfg.eps_high),
        math.inf if cfg.delta is None else float(cfg.delta),
        math.inf if cfg.log_ratio_clamp is None else float(cfg.log_ratio_clamp),
        HAS_OLD=old is not None,
        HAS_REF=has_ref,
        TOKEN_LOSS=token,
        WRITE_GRAD=out is not None,
        **_launch_kwargs(launch, v),
    )
    return lse, logp, dlp, tok


def _loss_terms(logits, ids, old, ref, adv, mask_f, scale, cfg, out, launch):
    """Forward: (loss, kl_b, low_b, high_b, lse, dlp) with dlp = d(loss)/d(logp) [N] for the backward."""
    lse, logp, dlp, tok = _row_fwd(logits, ids, old, ref, adv, mask_f, scale, cfg, out, launch)
    if tok is not None:
        sums = tok.sum(-1)  # [4, B]: one reduction for the loss and the three metric sums
        return sums[0].sum(), sums[1], sums[2], sums[3], lse, dlp
    ref = ref if cfg.beta != 0.0 else None
    loss, dlp2, kl_b, low_b, high_b = grpo_fwd_triton(logp.view(ids.shape), old, ref, adv, mask_f, scale, cfg)
    return loss, kl_b, low_b, high_b, lse, dlp2.view(-1)


def _zero_tail(grad: torch.Tensor, length: int) -> None:
    """Zero the positions of a [B, L + 1, V] gradient past the L scored ones."""
    if grad.dim() == 3 and grad.shape[1] > length:
        grad[:, length:].zero_()


def _bwd(logits, ids, mask_f, lse, dlp, g, temperature, out, launch) -> None:
    n, v = ids.numel(), logits.shape[-1]
    _zero_tail(out, ids.shape[1])
    if n == 0:
        return
    rows_l, sb, sl = rows_view(logits, ids)
    _, db, dl = rows_view(out, ids)
    programs, iters = _grid(n, launch, logits.device)
    _grpo_logits_bwd_kernel[(programs,)](
        logits,
        sb,
        sl,
        out,
        db,
        dl,
        rows_l,
        n,
        v,
        iters,
        ids.contiguous(),
        mask_f,
        lse,
        dlp,
        g,
        float(temperature),
        **_launch_kwargs(launch, v),
    )


def _scale(out, ids, mask_f, g, launch) -> None:
    n, v = ids.numel(), out.shape[-1]
    if n == 0:
        return
    rows_l, db, dl = rows_view(out, ids)
    programs, iters = _grid(n, launch, out.device)
    _scale_grad_kernel[(programs,)](out, db, dl, rows_l, n, v, iters, mask_f, g, **_launch_kwargs(launch, v))


def _upstream(g_loss: torch.Tensor | None, device: torch.device) -> torch.Tensor:
    """The loss's upstream gradient as a 1-element fp32 device tensor (no host sync)."""
    if g_loss is None:
        return torch.zeros(1, dtype=torch.float32, device=device)
    return g_loss.detach().float().reshape(1).contiguous()


class OnePassFunction(torch.autograd.Function):
    """Forward: the row kernel (+ the per-sequence kernel at the sequence level); backward: one kernel."""

    @staticmethod
    def forward(ctx, logits, ids, old, ref, adv, mask_f, scale, cfg, inplace, fwd_launch, bwd_launch):
        if logits.stride(-1) != 1:
            logits = logits.contiguous()
        loss, kl_b, low_b, high_b, lse, dlp = _loss_terms(
            logits, ids, old, ref, adv, mask_f, scale, cfg, None, fwd_launch
        )
        ctx.save_for_backward(logits, ids, mask_f, lse, dlp)
        ctx.temperature, ctx.inplace, ctx.bwd_launch = cfg.temperature, inplace, bwd_launch
        ctx.mark_non_differentiable(kl_b, low_b, high_b)
        return loss, kl_b, low_b, high_b

    @staticmethod
    def backward(ctx, g_loss, *_):
        logits, ids, mask_f, lse, dlp = ctx.saved_tensors
        # in place: a fresh alias of the buffer, so a leaf adopts it as .grad without a copy (see logprob.py)
        out = logits.detach() if ctx.inplace else torch.empty_like(logits, memory_format=torch.contiguous_format)
        _bwd(logits, ids, mask_f, lse, dlp, _upstream(g_loss, logits.device), ctx.temperature, out, ctx.bwd_launch)
        if ctx.inplace:
            mark_overwritten(logits)
        return out, *([None] * 10)


class FusedFunction(torch.autograd.Function):
    """Forward and backward in one kernel at forward time (token level); the backward rescales if g != 1."""

    @staticmethod
    def forward(ctx, logits, ids, old, ref, adv, mask_f, scale, cfg, inplace, launch, scale_launch):
        source = logits if logits.stride(-1) == 1 else logits.contiguous()
        if inplace and source is logits:
            out = logits.detach()
        else:
            out = torch.empty_like(logits, memory_format=torch.contiguous_format)
        loss, kl_b, low_b, high_b, _, _ = _loss_terms(source, ids, old, ref, adv, mask_f, scale, cfg, out, launch)
        _zero_tail(out, ids.shape[1])
        if out.data_ptr() == logits.data_ptr():
            mark_overwritten(logits)  # the logits now hold their gradient: later autograd uses of them raise
        ctx.grad_out, ctx.ids, ctx.mask_f, ctx.scale_launch = out, ids, mask_f, scale_launch
        ctx.mark_non_differentiable(kl_b, low_b, high_b)
        return loss, kl_b, low_b, high_b

    @staticmethod
    def backward(ctx, g_loss, *_):
        out = ctx.grad_out
        if out is None:
            raise RuntimeError("grpo_loss_from_logits(impl='fused'): backward may run only once (retain_graph)")
        ctx.grad_out = None
        _scale(out, ctx.ids, ctx.mask_f, _upstream(g_loss, out.device), ctx.scale_launch)
        return out, *([None] * 10)


def grpo_from_logits_triton(
    logits: torch.Tensor,
    ids: torch.Tensor,
    old_logp: torch.Tensor | None,
    ref_logp: torch.Tensor | None,
    advantages: torch.Tensor,
    mask_f: torch.Tensor,
    scale: torch.Tensor,
    cfg: GRPOLossConfig,
    impl: str,
    inplace_backward: bool,
    launch: dict[str, LogitsLaunch] | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The ``one_pass`` / ``fused`` paths of ``grpo_loss_from_logits`` (inputs already checked there; mask_f is
    the fp32 contiguous mask, scale the per-sequence aggregation factor). ``launch`` overrides the launch
    configurations by kernel: "fwd", "bwd", "fused", "scale"."""
    launch = {"fwd": FWD_LAUNCH, "bwd": BWD_LAUNCH, "fused": FUSED_LAUNCH, "scale": SCALE_LAUNCH, **(launch or {})}
    ref = ref_logp if cfg.beta != 0.0 else None
    needs_grad = torch.is_grad_enabled() and logits.requires_grad
    fused = impl == "fused" and cfg.importance_level == "token"
    if not needs_grad:
        source = logits if logits.stride(-1) == 1 else logits.contiguous()
        inputs = (source, ids, old_logp, ref, advantages, mask_f, scale, cfg)
        loss, kl_b, low_b, high_b, _, _ = _loss_terms(*inputs, None, launch["fwd"])
    elif fused:
        inputs = (logits, ids, old_logp, ref, advantages, mask_f, scale, cfg, inplace_backward)
        loss, kl_b, low_b, high_b = FusedFunction.apply(*inputs, launch["fused"], launch["scale"])
    else:
        inputs = (logits, ids, old_logp, ref, advantages, mask_f, scale, cfg, inplace_backward)
        loss, kl_b, low_b, high_b = OnePassFunction.apply(*inputs, launch["fwd"], launch["bwd"])
    return loss, metrics_from_sums(kl_b, low_b, high_b, mask_f, cfg)
