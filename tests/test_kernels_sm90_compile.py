"""The Triton kernels compile for an H100 (sm_90) without a GPU, and their PTX does no fp64 arithmetic, even when
the float hyper-parameters arrive as fp64 scalars.

CI has no GPU and the interpreter does not type-check like the compiler does, so this catches kernels that only
break on a real device. Each kernel is compiled in its fullest variant (every optional input present).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from sif_kernels.grpo_logits import _grpo_logits_bwd_kernel, _grpo_logits_fwd_kernel, _scale_grad_kernel
from sif_kernels.grpo_loss import _grpo_seq_kernel
from sif_kernels.linear_logprob import _tile_bwd_kernel, _tile_fwd_kernel
from sif_kernels.logprob import _logprob_bwd_kernel, _logprob_fwd_kernel

ROW = {"stride_xb": "i64", "stride_xl": "i64", "L": "i32", "TARGET": "*i64", "ROW_MASK": "*i8", "LSE": "*fp32"}
KERNELS = {
    "logprob_fwd": (
        _logprob_fwd_kernel,
        {"X": "*bf16", **ROW, "LOGP": "*fp32", "ENT": "*fp32", "V": "i32", "temperature": "fp32"},
        {"HAS_ROW_MASK": True, "WITH_ENTROPY": True, "BLOCK_V": 4096},
        8,
    ),
    "logprob_bwd": (
        _logprob_bwd_kernel,
        {
            "X": "*bf16",
            **ROW,
            "DX": "*bf16",
            "stride_db": "i64",
            "stride_dl": "i64",
            "ENT": "*fp32",
            "G_LOGP": "*fp32",
            "G_ENT": "*fp32",
            "V": "i32",
            "temperature": "fp32",
        },
        {"HAS_ROW_MASK": True, "HAS_G_ENT": True, "BLOCK_V": 4096},
        8,
    ),
    "grpo_seq": (
        _grpo_seq_kernel,
        {
            **{
                name: "*fp32"
                for name in ("LP", "OLD", "REF", "ADV", "MASK", "SCALE", "DLP", "LOSS_B", "KL_B", "LOW_B", "HIGH_B")
            },
            "L": "i32",
            **{name: "fp32" for name in ("beta", "eps_low", "eps_high", "delta", "clamp")},
        },
        {"HAS_OLD": True, "HAS_REF": True, "SEQUENCE": True, "BLOCK_L": 1024},
        4,
    ),
    "grpo_logits_fused": (
        _grpo_logits_fwd_kernel,
        GRPO_LOGITS_FWD := {
            "X": "*bf16",
            **{k: "i64" for k in ("stride_xb", "stride_xl")},
            "DX": "*bf16",
            **{k: "i64" for k in ("stride_db", "stride_dl")},
            **{k: "i32" for k in ("L", "N", "V", "ITERS")},
            "TARGET": "*i64",
            **{name: "*fp32" for name in ("MASK", "ADV", "SCALE", "OLD", "REF", "LOGP", "LSE", "DLP", "TOK")},
            **{name: "fp32" for name in ("temperature", "beta", "eps_low", "eps_high", "delta", "clamp")},
        },
        {"HAS_OLD": True, "HAS_REF": True, "TOKEN_LOSS": True, "WRITE_GRAD": True, "BLOCK_V": 8192},
        8,
    ),
    "grpo_logits_seq": (
        _grpo_logits_fwd_kernel,
        GRPO_LOGITS_FWD,
        {"HAS_OLD": True, "HAS_REF": True, "TOKEN_LOSS": False, "WRITE_GRAD": False, "BLOCK_V": 2048},
        1,
    ),
    "grpo_logits_bwd": (
        _grpo_logits_bwd_kernel,
        {
            "X": "*bf16",
            **{k: "i64" for k in ("stride_xb", "stride_xl")},
            "DX": "*bf16",
            **{k: "i64" for k in ("stride_db", "stride_dl")},
            **{k: "i32" for k in ("L", "N", "V", "ITERS")},
            "TARGET": "*i64",
            **{name: "*fp32" for name in ("MASK", "LSE", "DLP", "G")},
            "temperature": "fp32",
        },
        {"BLOCK_V": 8192},
        4,
    ),
    "grpo_logits_scale": (
        _scale_grad_kernel,
        {
            "DX": "*bf16",
            **{k: "i64" for k in ("stride_db", "stride_dl")},
            **{k: "i32" for k in ("L", "N", "V", "ITERS")},
            **{name: "*fp32" for name in ("MASK", "G")},
        },
        {"BLOCK_V": 4096},
        8,
    ),
    "tile_fwd": (
        _tile_fwd_kernel,
        {
            "TILE": "*fp32",
            "stride_t": "i64",
            "TARGET": "*i64",
            "M": "*fp32",
            "S": "*fp32",
            "T_ACC": "*fp32",
            "X_T": "*fp32",
            "vc": "i32",
            "v0": "i32",
            "temperature": "fp32",
        },
        {"WITH_ENTROPY": True, "BLOCK_V": 2048},
        8,
    ),
    "tile_bwd": (
        _tile_bwd_kernel,
        {
            "TILE": "*fp32",
            "stride_t": "i64",
            "OUT": "*bf16",
            "stride_o": "i64",
            "TARGET": "*i64",
            "LSE": "*fp32",
            "ENT": "*fp32",
            "G_LOGP": "*fp32",
            "G_ENT": "*fp32",
            "vc": "i32",
            "v0": "i32",
            "temperature": "fp32",
        },
        {"HAS_G_ENT": True, "BLOCK_V": 2048},
        8,
    ),
}


def _fp64_lines(ptx: str) -> list[str]:
    """PTX lines that compute in fp64: anything mentioning f64 except parameter declarations/loads and the
    conversion of an fp64 parameter to fp32."""
    allowed = (".param .f64", "ld.param.f64", "ld.param.b64", "cvt.rn.f32.f64")
    return [line.strip() for line in ptx.splitlines() if "f64" in line and not line.strip().startswith(allowed)]


def compile_all() -> dict[str, dict]:
    """Compile every kernel for sm_90, with fp32 and with fp64 float scalars (as some callers pass them);
    {name: {"error": str | None, "fp64": [offending PTX lines]}}."""
    results = {}
    for name, (fn, signature, constexprs, num_warps) in KERNELS.items():
        if set(signature) | set(constexprs) != set(fn.arg_names):
            results[name] = {"error": "signature out of date with the kernel", "fp64": []}
            continue
        offending = []
        try:
            for scalar in ("fp32", "fp64"):
                sig = {k: scalar if v == "fp32" else v for k, v in signature.items()}
                compiled = triton.compile(
                    ASTSource(fn, sig, constexprs), target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps}
                )
                offending += _fp64_lines(compiled.asm["ptx"])
        except Exception as err:  # reported per kernel by the test
            results[name] = {"error": f"{type(err).__name__}: {err}"[:2000], "fp64": []}
            continue
        results[name] = {"error": None, "fp64": offending}
    return results


@pytest.fixture(scope="module")
def compiled() -> dict[str, dict]:
    # The interpreter (TRITON_INTERPRET=1) patches triton.language, so compile in a clean subprocess.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = Path(__file__).resolve().parents[1]
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), env.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, __file__], capture_output=True, text=True, env=env, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("name", list(KERNELS))
def test_kernel_compiles_for_sm90_without_fp64(compiled, name):
    result = compiled[name]
    if result["error"] and "ptxas" in result["error"].lower() and "not found" in result["error"].lower():
        pytest.skip(f"Triton's bundled ptxas is unavailable: {result['error']}")
    assert result["error"] is None, f"{name}: {result['error']}"
    assert not result["fp64"], f"{name}: fp64 arithmetic in the PTX: {result['fp64'][:5]}"


if __name__ == "__main__":
    print(json.dumps(compile_all()))
