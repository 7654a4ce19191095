"""Kernel microbenchmarks for the RL path: forward and forward+backward time, peak extra memory, % of bound.

    python -m benchmarks.kernels --device cuda --out benchmarks/results/kernels_h100.json
    python -m benchmarks.kernels --device cpu --out results_cpu.json

Ops and implementations compared:
- token_logprobs (logits → per-token log-probs): ours (Triton), torch reference eager / torch.compile, TRL-style
  selective_log_softmax, Liger's fused_selective_log_softmax (forward only, it has no backward).
- grpo_from_logits (fwd+bwd of the GRPO loss from logits): ours (in-place gradient) as impl="two_pass" (the
  default), "one_pass" and "fused" (sif_kernels/grpo_logits.py), Liger triton_grpo_loss (inplace=True), torch
  reference eager / torch.compile; at the token importance level, and with ``--grpo-levels`` also at the
  sequence level (CUDA).
- linear_logprobs (hidden, lm_head → log-probs): ours (Triton tiles on CUDA, chunked torch on CPU), materialised
  logits in torch (eager / compile).
- grpo_from_hidden (hidden → GRPO loss): ours (linear_token_logprobs + grpo_loss), Liger LigerFusedLinearGRPOLoss.

% of bound (CUDA only): memory-bound ops against a measured device copy bandwidth (forward reads the logits once;
forward+backward = 3 passes: read, read, write), matmul-bound ops against a measured bf16 cuBLAS matmul rate
(2·N·V·H forward, 6·N·V·H forward+backward, i.e. without the recompute a memory-lean backward needs).
Peak MiB is the memory beyond the inputs during one forward+backward: CUDA allocator peak, or on CPU the peak
RSS growth of a fresh subprocess that builds the inputs and runs the op once.

``--sweep`` instead times the token_logprobs forward and backward kernels at each launch configuration (BLOCK_V ×
num_warps) on N=8192 rows of V=151936 bf16 logits; the defaults in ``sif_kernels/logprob.py`` come from its H200 run.
``--sweep-grpo`` times grpo_loss_from_logits(impl="one_pass" / "fused") at each launch configuration of their
kernels (BLOCK_V × warps × stages × programs per SM) at B=8, L=1024, V=151936 bf16, the defaults in
``sif_kernels/grpo_logits.py`` marked; fwd+bwd % of bound is against the same 3-pass bound, so the fused kernel shows
above 100 % exactly when its second read of a row comes from L2.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch

from benchmarks.common import (
    cuda_peak_extra_mib,
    environment,
    markdown_table,
    measure_in_subprocess,
    rss_peak_mib,
    time_ms,
    write_json,
)
from sif_kernels import GRPOLossConfig, grpo_loss, grpo_loss_from_logits, linear_token_logprobs, token_logprobs
from sif_kernels._dispatch import interpreter_enabled
from sif_kernels.grpo_logits import BWD_LAUNCH, FUSED_LAUNCH, FWD_LAUNCH, LogitsLaunch, grpo_from_logits_triton
from sif_kernels.grpo_loss import aggregation_scale
from sif_kernels.logprob import logprob_bwd_triton, logprob_fwd_triton, token_logprobs_reference

CFG = GRPOLossConfig(beta=0.04, eps_low=0.2, eps_high=0.28, loss_type="grpo")


@dataclass
class Case:
    impl: str
    fwd: Callable[[], object] | None
    fwdbwd: Callable[[], object] | None


@dataclass(frozen=True)
class Group:
    """One op at one shape; ``kind`` says how its bound is computed ("bytes" per pass or "flops")."""

    op: str
    shape: dict
    kind: str
    timed: bool = True

    @property
    def label(self) -> str:
        return " ".join(f"{k}={v}" for k, v in self.shape.items() if k != "dtype") + f" {self.shape['dtype']}"


def selective_log_softmax_trl(logits: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """TRL's selective_log_softmax, re-stated: gather minus a per-row logsumexp for fp32/fp64, else a row loop."""
    if logits.dtype in (torch.float32, torch.float64):
        selected = torch.gather(logits, -1, index.unsqueeze(-1)).squeeze(-1)
        lse = torch.stack([torch.logsumexp(row, dim=-1) for row in logits])
        return selected - lse
    out = []
    for row_logits, row_index in zip(logits, index):
        row_logp = torch.log_softmax(row_logits, dim=-1)
        out.append(row_logp.gather(-1, row_index.unsqueeze(-1)).squeeze(-1))
    return torch.stack(out)


def _fwdbwd(make_loss: Callable[[], torch.Tensor], leaves: list[torch.Tensor]) -> Callable[[], None]:
    def run() -> None:
        for t in leaves:
            t.grad = None
        make_loss().backward()

    return run


def _maybe_compile(fn, enabled: bool):
    return torch.compile(fn, dynamic=False) if enabled else None


def _triton(device: str) -> bool:
    """Whether Triton implementations (ours, Liger's) run: on CUDA, or on CPU under TRITON_INTERPRET=1 (smoke)."""
    return device == "cuda" or interpreter_enabled()


def _dtype(name: str) -> torch.dtype:
    return {"bf16": torch.bfloat16, "fp32": torch.float32}[name]


def build_token_logprobs(shape: dict, device: str, compile_: bool) -> list[Case]:
    n, v, dtype = shape["N"], shape["V"], _dtype(shape["dtype"])
    logits = torch.randn(n, v, device=device, dtype=dtype)
    target = torch.randint(0, v, (n,), device=device)
    leaf = logits.clone().requires_grad_(True)
    cases = [
        Case(
            "torch eager",
            lambda: token_logprobs_reference(logits, target),
            _fwdbwd(lambda: token_logprobs_reference(leaf, target).sum(), [leaf]),
        ),
        Case(
            "TRL selective_log_softmax",
            lambda: selective_log_softmax_trl(logits, target),
            _fwdbwd(lambda: selective_log_softmax_trl(leaf, target).sum(), [leaf]),
        ),
    ]
    compiled = _maybe_compile(token_logprobs_reference, compile_)
    if compiled is not None:
        cases.append(
            Case(
                "torch.compile",
                lambda: compiled(logits, target),
                _fwdbwd(lambda: compiled(leaf, target).sum(), [leaf]),
            )
        )
    if _triton(device):
        from liger_kernel.ops.grpo_loss import fused_selective_log_softmax

        own = logits.clone().requires_grad_(True)  # in-place backward: its data become gradients, keep it apart

        cases.append(
            Case(
                "liger fused_selective_log_softmax",
                lambda: fused_selective_log_softmax(logits[None], target[None, 1:], 1.0),
                None,
            )
        )
        cases.append(
            Case(
                "ours (triton, in-place bwd)",
                lambda: token_logprobs(logits, target, backend="triton"),
                _fwdbwd(lambda: token_logprobs(own, target, inplace_backward=True, backend="triton").sum(), [own]),
            )
        )
    return cases


def _grpo_inputs(b: int, length: int, device: str):
    gen = torch.Generator(device="cpu").manual_seed(0)
    old = (-torch.rand(b, length, generator=gen) * 5).to(device)
    ref = old + (torch.randn(b, length, generator=gen) * 0.1).to(device)
    adv = torch.randn(b, generator=gen).to(device)
    mask = torch.ones(b, length, dtype=torch.bool, device=device)
    mask[:, int(length * 0.8) :] = False
    return old, ref, adv, mask


def build_grpo_from_logits(shape: dict, device: str, compile_: bool) -> list[Case]:
    b, length, v, dtype = shape["B"], shape["L"], shape["V"], _dtype(shape["dtype"])
    cfg = dataclasses.replace(CFG, importance_level=shape.get("level", "token"))
    full = torch.randn(b, length + 1, v, device=device, dtype=dtype)
    ids = torch.randint(0, v, (b, length), device=device)
    old, ref, adv, mask = _grpo_inputs(b, length, device)
    leaf = full.clone().requires_grad_(True)

    def ours(x, impl="two_pass"):  # x: [B, L + 1, V], as Liger takes it; the gradient lands in x's buffer
        return grpo_loss_from_logits(x, ids, old, ref, adv, mask, cfg, impl=impl, backend="triton")[0]

    def reference(x):
        return grpo_loss_from_logits(x, ids, old, ref, adv, mask, cfg, backend="torch")[0]

    cases = [Case("torch eager", lambda: reference(full), _fwdbwd(lambda: reference(leaf), [leaf]))]
    compiled = _maybe_compile(reference, compile_)
    if compiled is not None:
        cases.append(Case("torch.compile", lambda: compiled(full), _fwdbwd(lambda: compiled(leaf), [leaf])))
    if _triton(device):
        from liger_kernel.transformers.grpo_loss import triton_grpo_loss

        def liger(x):
            return triton_grpo_loss(
                x,
                old,
                ref,
                ids,
                adv,
                mask,
                temperature=cfg.temperature,
                beta=cfg.beta,
                eps_low=cfg.eps_low,
                eps_high=cfg.eps_high,
                inplace=True,
                loss_type=cfg.loss_type,
                importance_sampling_level=cfg.importance_level,
                reduce=True,
            )[0]

        # every backward writes the gradient into its logits: each gets its own copy (whose values then stay
        # gradient-sized, which no kernel's speed depends on)
        liger_leaf = full.clone().requires_grad_(True)
        cases.append(
            Case("liger triton_grpo_loss", lambda: liger(full), _fwdbwd(lambda: liger(liger_leaf), [liger_leaf]))
        )
        for name, impl in (
            ("ours (triton, in-place bwd)", "two_pass"),
            ("ours one_pass (in-place bwd)", "one_pass"),
            ("ours fused (in-place)", "fused"),
        ):
            own = full.clone().requires_grad_(True)
            cases.append(
                Case(
                    name,
                    lambda impl=impl: ours(full, impl),
                    _fwdbwd(lambda own=own, impl=impl: ours(own, impl), [own]),
                )
            )
    return cases


def build_linear_logprobs(shape: dict, device: str, compile_: bool) -> list[Case]:
    n, h, v, dtype = shape["N"], shape["H"], shape["V"], _dtype(shape["dtype"])
    hidden = torch.randn(n, h, device=device, dtype=dtype)
    weight = torch.randn(v, h, device=device, dtype=dtype) / math.sqrt(h)
    target = torch.randint(0, v, (n,), device=device)
    hl, wl = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)

    def materialised(x, w):
        return token_logprobs_reference(x @ w.T, target)

    backend = "triton" if _triton(device) else "torch"
    ours_name = "ours (triton tiles)" if backend == "triton" else "ours (chunked torch)"
    cases = [
        Case(
            "materialised logits (torch)",
            lambda: materialised(hidden, weight),
            _fwdbwd(lambda: materialised(hl, wl).sum(), [hl, wl]),
        ),
        Case(
            ours_name,
            lambda: linear_token_logprobs(hidden, weight, target, backend=backend),
            _fwdbwd(lambda: linear_token_logprobs(hl, wl, target, backend=backend).sum(), [hl, wl]),
        ),
    ]
    compiled = _maybe_compile(materialised, compile_)
    if compiled is not None:
        cases.append(
            Case(
                "materialised (torch.compile)",
                lambda: compiled(hidden, weight),
                _fwdbwd(lambda: compiled(hl, wl).sum(), [hl, wl]),
            )
        )
    return cases


def build_grpo_from_hidden(shape: dict, device: str, compile_: bool) -> list[Case]:
    from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

    b, length, h, v, dtype = shape["B"], shape["L"], shape["H"], shape["V"], _dtype(shape["dtype"])
    hidden = torch.randn(b, length, h, device=device, dtype=dtype)
    weight = torch.randn(v, h, device=device, dtype=dtype) / math.sqrt(h)
    ids = torch.randint(0, v, (b, length), device=device)
    old, ref, adv, mask = _grpo_inputs(b, length, device)
    hl, wl = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    liger_loss = LigerFusedLinearGRPOLoss(
        beta=CFG.beta,
        compiled=compile_,
        use_ref_model=True,
        epsilon_low=CFG.eps_low,
        epsilon_high=CFG.eps_high,
        loss_type="grpo",
        temperature=CFG.temperature,
    )

    backend = "triton" if _triton(device) else "torch"

    def ours(x, w):
        logp = linear_token_logprobs(x.reshape(-1, h), w, ids.reshape(-1), backend=backend).view(b, length)
        return grpo_loss(logp, old, ref, adv, mask, CFG, backend=backend)[0]

    def liger(x, w):
        return liger_loss(x, w, ids, mask, adv, ref_per_token_logps=ref, old_per_token_logps=old)[0]

    return [
        Case("liger LigerFusedLinearGRPOLoss", lambda: liger(hidden, weight), _fwdbwd(lambda: liger(hl, wl), [hl, wl])),
        Case("ours (linear + grpo_loss)", lambda: ours(hidden, weight), _fwdbwd(lambda: ours(hl, wl), [hl, wl])),
    ]


BUILDERS = {
    "token_logprobs": build_token_logprobs,
    "grpo_from_logits": build_grpo_from_logits,
    "linear_logprobs": build_linear_logprobs,
    "grpo_from_hidden": build_grpo_from_hidden,
}


SMOKE = [
    Group("token_logprobs", {"N": 6, "V": 300, "dtype": "fp32"}, "bytes"),
    Group("grpo_from_logits", {"B": 2, "L": 3, "V": 300, "dtype": "fp32"}, "bytes"),
    Group("grpo_from_logits", {"B": 2, "L": 3, "V": 300, "level": "sequence", "dtype": "fp32"}, "bytes"),
    Group("linear_logprobs", {"N": 6, "H": 8, "V": 300, "dtype": "fp32"}, "flops"),
    Group("grpo_from_hidden", {"B": 2, "L": 3, "H": 8, "V": 300, "dtype": "fp32"}, "flops"),
]


CUDA_SIZES = (4096, 8192, 16384)


def groups_for(
    device: str, smoke: bool = False, sizes: tuple[int, ...] = CUDA_SIZES, grpo_levels: tuple[str, ...] = ("token",)
) -> list[Group]:
    """The shape groups of one run; ``sizes`` are the CUDA token counts (multiples of 1024), ``grpo_levels`` the
    importance levels of the CUDA grpo_from_logits groups."""
    if smoke:
        return SMOKE
    if device == "cuda":
        out = []
        for n in sizes:
            out.append(Group("token_logprobs", {"N": n, "V": 151936, "dtype": "bf16"}, "bytes"))
            for level in grpo_levels:
                grpo = {"B": n // 1024, "L": 1024, "V": 151936, **({"level": level} if level != "token" else {})}
                out.append(Group("grpo_from_logits", {**grpo, "dtype": "bf16"}, "bytes"))
            out.append(Group("linear_logprobs", {"N": n, "H": 3584, "V": 152064, "dtype": "bf16"}, "flops"))
            out.append(
                Group("grpo_from_hidden", {"B": n // 1024, "L": 1024, "H": 3584, "V": 152064, "dtype": "bf16"}, "flops")
            )
        return out
    big = {"H": 64, "V": 152064, "dtype": "fp32"}
    return [
        Group("token_logprobs", {"N": 256, "V": 32000, "dtype": "fp32"}, "bytes"),
        Group("grpo_from_logits", {"B": 2, "L": 128, "V": 32000, "dtype": "fp32"}, "bytes"),
        Group("linear_logprobs", {"N": 512, "H": 64, "V": 32000, "dtype": "fp32"}, "flops"),
        Group("grpo_from_hidden", {"B": 2, "L": 128, "H": 64, "V": 32000, "dtype": "fp32"}, "flops"),
        # the CPU memory target: fused-linear vs materialised logits at N=2048, V=152064 (memory only)
        Group("linear_logprobs", {"N": 2048, **big}, "flops", timed=False),
        Group("grpo_from_hidden", {"B": 4, "L": 512, **big}, "flops", timed=False),
    ]


def device_limits(device: str) -> dict:
    """Measured copy bandwidth (bytes/s, read+write) and bf16 matmul rate (FLOP/s) on CUDA; empty on CPU."""
    if device != "cuda":
        return {}
    src = torch.empty(1 << 30, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    copy_ms = time_ms(lambda: dst.copy_(src), device, warmup=3, iters=20)
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    mm_ms = time_ms(lambda: a @ a, device, warmup=3, iters=20)
    return {"copy_bytes_per_s": 2 * (1 << 30) / (copy_ms * 1e-3), "bf16_flops_per_s": 2 * 8192**3 / (mm_ms * 1e-3)}


def bounds_ms(group: Group, limits: dict) -> tuple[float | None, float | None]:
    """(forward, forward+backward) lower bounds in ms, or None where no device limit was measured."""
    s = group.shape
    if not limits:
        return None, None
    if group.kind == "bytes":
        rows = s["N"] if "N" in s else s["B"] * s["L"]
        one_pass = rows * s["V"] * _dtype(s["dtype"]).itemsize / limits["copy_bytes_per_s"] * 1e3
        return one_pass, 3 * one_pass
    n = s["N"] if "N" in s else s["B"] * s["L"]
    fwd = 2.0 * n * s["V"] * s["H"] / limits["bf16_flops_per_s"] * 1e3
    return fwd, 3 * fwd


def _child(group_index: int, impl: str, device: str, compile_: bool) -> None:
    """Subprocess entry (CPU): build one group's inputs, run one impl's forward+backward once, print peak RSS growth."""
    group = groups_for(device)[group_index]
    cases = {c.impl: c for c in BUILDERS[group.op](group.shape, device, compile_)}
    gc.collect()
    base = rss_peak_mib()
    case = cases[impl]
    (case.fwdbwd or case.fwd)()
    print(json.dumps({"peak_mib": rss_peak_mib() - base}))


def run(
    device: str,
    compile_: bool,
    iters: int,
    only: set[str] | None,
    limits: dict,
    smoke: bool,
    sizes: tuple[int, ...],
    grpo_levels: tuple[str, ...] = ("token",),
) -> list[dict]:
    rows = []
    for index, group in enumerate(groups_for(device, smoke, sizes, grpo_levels)):
        if only and group.op not in only:
            continue
        cases = BUILDERS[group.op](group.shape, device, compile_)
        bound_f, bound_fb = bounds_ms(group, limits)
        for case in cases:
            row = {"op": group.op, "shape": group.label, "impl": case.impl}
            try:
                if group.timed:
                    with torch.no_grad():
                        row["fwd_ms"] = time_ms(case.fwd, device, warmup=1, iters=iters) if case.fwd else None
                    row["fwdbwd_ms"] = time_ms(case.fwdbwd, device, warmup=1, iters=iters) if case.fwdbwd else None
                if device == "cuda":
                    row["peak_mib"] = cuda_peak_extra_mib(case.fwdbwd or case.fwd)
                elif not smoke:
                    argv = ["-m", "benchmarks.kernels", "--device", device, "--child", str(index), case.impl]
                    row["peak_mib"] = measure_in_subprocess(argv + (["--compile"] if compile_ else []))["peak_mib"]
            except (RuntimeError, torch.OutOfMemoryError) as err:  # report, keep going
                row["error"] = str(err).splitlines()[0][:200]
            row["fwd_pct_bound"] = 100 * bound_f / row["fwd_ms"] if bound_f and row.get("fwd_ms") else None
            row["fwdbwd_pct_bound"] = 100 * bound_fb / row["fwdbwd_ms"] if bound_fb and row.get("fwdbwd_ms") else None
            rows.append(row)
            print(json.dumps(row), file=sys.stderr)
        del cases
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
    return rows


def _time_logprob_launch(
    logits: torch.Tensor, target: torch.Tensor, out: torch.Tensor, launch: dict, device: str, iters: int
) -> tuple[float, float]:
    """(forward ms, backward ms) of the token_logprobs kernels at one launch configuration."""
    _, lse, ent = logprob_fwd_triton(logits, target, 1.0, False, **launch)
    g = torch.ones_like(lse)
    fwd = time_ms(lambda: logprob_fwd_triton(logits, target, 1.0, False, **launch), device, 1, iters)
    bwd = time_ms(lambda: logprob_bwd_triton(logits, target, lse, ent, g, None, 1.0, out, **launch), device, 1, iters)
    return fwd, bwd


def sweep_logprob_launch(device: str, smoke: bool, iters: int, limits: dict) -> list[dict]:
    """Forward and backward kernel times of token_logprobs at every (BLOCK_V, num_warps); % of the copy bound
    (forward: one read of the logits; backward: a read and a write). The backward writes into a separate buffer,
    so repeated calls see the same input."""
    n, v, dtype = (6, 300, torch.float32) if smoke else (8192, 151936, torch.bfloat16)
    blocks, warps = ((64, 128), (1, 4)) if smoke else ((1024, 2048, 4096, 8192), (1, 2, 4, 8))
    logits = torch.randn(n, v, device=device, dtype=dtype)
    target = torch.randint(0, v, (n,), device=device)
    out = torch.empty_like(logits)
    one_pass_ms = n * v * logits.element_size() / limits["copy_bytes_per_s"] * 1e3 if limits else None
    rows = []
    for block_v in blocks:
        for num_warps in warps:
            launch = {"block_v": block_v, "num_warps": num_warps}
            row = {"N": n, "V": v, "dtype": str(dtype).removeprefix("torch."), **launch}
            row["fwd_ms"], row["bwd_ms"] = _time_logprob_launch(logits, target, out, launch, device, iters)
            if one_pass_ms:
                row["fwd_pct_bound"] = 100 * one_pass_ms / row["fwd_ms"]
                row["bwd_pct_bound"] = 100 * 2 * one_pass_ms / row["bwd_ms"]
            rows.append(row)
            print(json.dumps(row), file=sys.stderr)
    return rows


def _grpo_sweep_launches(smoke: bool) -> list[tuple[str, str, dict[str, LogitsLaunch]]]:
    """(impl, swept kernel, launch overrides) of the --sweep-grpo run: the fused kernel's configurations, then the
    one_pass forward's (with the default backward) and the one_pass backward's (with the default forward)."""
    if smoke:
        fused = [LogitsLaunch(bv, 1, None, pps) for bv in (64, 128) for pps in (1, 0)]
        fwd = [LogitsLaunch(64, 1, 2)]
        bwd = [LogitsLaunch(128, 1)]
    else:
        # 28 configurations: an estimated two minutes on an H200, compiles included (not yet run)
        fused = [LogitsLaunch(bv, w, None, pps) for bv in (8192, 16384) for w in (4, 8, 16) for pps in (1, 2, 0)]
        fwd = [LogitsLaunch(bv, w, 2) for bv in (1024, 2048, 4096) for w in (1, 2)]
        bwd = [LogitsLaunch(bv, w) for bv in (4096, 8192) for w in (4, 16)]
    out = [("fused", "fused", {"fused": launch}) for launch in fused]
    out += [("one_pass", "fwd", {"fwd": launch, "bwd": BWD_LAUNCH}) for launch in fwd]
    out += [("one_pass", "bwd", {"fwd": FWD_LAUNCH, "bwd": launch}) for launch in bwd]
    return out


def sweep_grpo_launch(device: str, smoke: bool, iters: int, limits: dict) -> list[dict]:
    """fwd+bwd time of grpo_loss_from_logits(impl="one_pass" | "fused") at each launch configuration (token level,
    CFG, in-place gradient), and the forward without grad on the rows that sweep the "fwd" kernel (the one it
    runs); % of bound as in the main table (fwd: one read of the logits, fwd+bwd: three passes)."""
    b, length, v, dtype = (2, 3, 300, torch.float32) if smoke else (8, 1024, 151936, torch.bfloat16)
    full = torch.randn(b, length + 1, v, device=device, dtype=dtype)
    leaf = full.clone().requires_grad_(True)
    ids = torch.randint(0, v, (b, length), device=device)
    old, ref, adv, mask = _grpo_inputs(b, length, device)
    mask_f = mask.float().contiguous()
    scale = aggregation_scale(mask_f, CFG, None)
    one_pass_ms = b * length * v * full.element_size() / limits["copy_bytes_per_s"] * 1e3 if limits else None
    defaults = {"fused": FUSED_LAUNCH, "fwd": FWD_LAUNCH, "bwd": BWD_LAUNCH}
    rows = []
    for impl, key, launch in _grpo_sweep_launches(smoke):
        swept = launch[key]

        def loss(x, launch=launch, impl=impl):
            return grpo_from_logits_triton(x, ids, old, ref, adv, mask_f, scale, CFG, impl, True, launch=launch)[0]

        row = {"impl": impl, "kernel": key, **dataclasses.asdict(swept), "default": swept == defaults[key]}
        try:
            row["fwd_ms"] = None  # the forward without grad runs the "fwd" kernel: timed on its rows only
            if key == "fwd":
                with torch.no_grad():
                    row["fwd_ms"] = time_ms(lambda loss=loss: loss(full), device, 1, iters)
            row["fwdbwd_ms"] = time_ms(_fwdbwd(lambda loss=loss: loss(leaf), [leaf]), device, 1, iters)
        except (RuntimeError, torch.OutOfMemoryError) as err:  # e.g. out of resources: report, keep going
            row["error"] = str(err).splitlines()[0][:200]
        if one_pass_ms and "error" not in row:
            row["fwd_pct_bound"] = 100 * one_pass_ms / row["fwd_ms"] if row["fwd_ms"] else None
            row["fwdbwd_pct_bound"] = 100 * 3 * one_pass_ms / row["fwdbwd_ms"]
        rows.append(row)
        print(json.dumps(row), file=sys.stderr)
    return rows


GRPO_SWEEP_COLUMNS = [
    ("impl", "impl"),
    ("kernel", "kernel"),
    ("block_v", "BLOCK_V"),
    ("num_warps", "warps"),
    ("num_stages", "stages"),
    ("programs_per_sm", "programs/SM"),
    ("default", "default"),
    ("fwd_ms", "fwd ms"),
    ("fwdbwd_ms", "fwd+bwd ms"),
    ("fwd_pct_bound", "fwd % of bound"),
    ("fwdbwd_pct_bound", "fwd+bwd % of bound"),
]

SWEEP_COLUMNS = [
    ("block_v", "BLOCK_V"),
    ("num_warps", "warps"),
    ("fwd_ms", "fwd ms"),
    ("bwd_ms", "bwd ms"),
    ("fwd_pct_bound", "fwd % of bound"),
    ("bwd_pct_bound", "bwd % of bound"),
]

COLUMNS = [
    ("op", "op"),
    ("shape", "shape"),
    ("impl", "impl"),
    ("fwd_ms", "fwd ms"),
    ("fwdbwd_ms", "fwd+bwd ms"),
    ("peak_mib", "peak MiB"),
    ("fwd_pct_bound", "fwd % of bound"),
    ("fwdbwd_pct_bound", "fwd+bwd % of bound"),
]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", help="write rows and environment as JSON here")
    parser.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="include torch.compile variants (default: on for cuda, off for cpu)",
    )
    parser.add_argument("--iters", type=int, default=None, help="timed iterations (default: 10 cuda, 2 cpu)")
    parser.add_argument("--ops", nargs="*", choices=sorted(BUILDERS), help="only these ops")
    parser.add_argument(
        "--sizes", type=int, nargs="+", default=list(CUDA_SIZES), help="CUDA token counts N = B·L (multiples of 1024)"
    )
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="tiny shapes, one iteration, no memory: checks every implementation runs (with "
        "TRITON_INTERPRET=1 on CPU this includes the Triton ones)",
    )
    parser.add_argument("--sweep", action="store_true", help="time the token_logprobs kernels' launch configurations")
    parser.add_argument(
        "--sweep-grpo",
        action="store_true",
        help="time the launch configurations of grpo_loss_from_logits(impl='one_pass' | 'fused')",
    )
    parser.add_argument(
        "--grpo-levels",
        nargs="+",
        choices=("token", "sequence"),
        default=["token"],
        help="importance levels of the CUDA grpo_from_logits groups",
    )
    parser.add_argument("--child", nargs=2, metavar=("GROUP", "IMPL"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but no CUDA device is available")
    compile_ = args.device == "cuda" if args.compile is None else args.compile
    if args.child:
        _child(int(args.child[0]), args.child[1], args.device, compile_)
        return
    torch.manual_seed(0)
    iters = 1 if args.smoke else args.iters or (10 if args.device == "cuda" else 2)
    limits = {} if args.smoke else device_limits(args.device)
    if any(n <= 0 or n % 1024 for n in args.sizes):
        parser.error(f"--sizes {args.sizes}: each must be a positive multiple of 1024 (B = N / 1024 rows of L = 1024)")
    env = environment(args.device)
    if args.sweep:
        if not _triton(args.device):
            parser.error("--sweep times Triton kernels: it needs CUDA, or TRITON_INTERPRET=1 with --smoke")
        rows = sweep_logprob_launch(args.device, args.smoke, iters, limits)
        print(f"\n{env['device']} · torch {env['torch']} · commit {env['commit']} · {env['date']}\n")
        print(markdown_table(rows, SWEEP_COLUMNS))
        if args.out:
            write_json(args.out, {"environment": env, "limits": limits, "sweep": rows})
        return
    if args.sweep_grpo:
        if not _triton(args.device):
            parser.error("--sweep-grpo times Triton kernels: it needs CUDA, or TRITON_INTERPRET=1 with --smoke")
        rows = sweep_grpo_launch(args.device, args.smoke, iters, limits)
        print(f"\n{env['device']} · torch {env['torch']} · commit {env['commit']} · {env['date']}\n")
        print(markdown_table(rows, GRPO_SWEEP_COLUMNS))
        if args.out:
            write_json(args.out, {"environment": env, "limits": limits, "sweep_grpo": rows})
        return
    only = set(args.ops) if args.ops else None
    rows = run(args.device, compile_, iters, only, limits, args.smoke, tuple(args.sizes), tuple(args.grpo_levels))
    print(f"\n{env['device']} · torch {env['torch']} · commit {env['commit']} · {env['date']}\n")
    print(markdown_table(rows, COLUMNS))
    for row in rows:
        if "error" in row:
            print(f"\n{row['op']} {row['shape']} {row['impl']}: {row['error']}")
    if args.out:
        write_json(args.out, {"environment": env, "limits": limits, "rows": rows})


if __name__ == "__main__":
    main()
