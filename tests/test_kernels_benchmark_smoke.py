"""benchmarks/kernels.py --smoke runs every implementation it compares (Triton ones through the interpreter) on
tiny shapes and writes its JSON, and so does its launch sweep: the benchmark cannot rot unnoticed between GPU runs.
No timing is asserted."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
HAS_TRITON = torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"


needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="the Triton implementations need CUDA or TRITON_INTERPRET=1")


def run_smoke(out: Path, *flags: str) -> tuple[str, dict]:
    """Run ``benchmarks.kernels --smoke FLAGS --out OUT`` in a subprocess; (its stdout, the JSON it wrote)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    device = "cuda" if torch.cuda.is_available() else "cpu"
    cmd = [sys.executable, "-m", "benchmarks.kernels", "--device", device, "--smoke", *flags, "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout, json.loads(out.read_text())


@needs_triton
def test_kernel_benchmark_smoke(tmp_path):
    stdout, result = run_smoke(tmp_path / "kernels.json", "--no-compile")
    rows = result["rows"]
    assert [r for r in rows if "error" in r] == []
    impls = {(r["op"], r["impl"]) for r in rows}
    for op, impl in [
        ("token_logprobs", "ours (triton, in-place bwd)"),
        ("grpo_from_logits", "ours (triton, in-place bwd)"),
        ("grpo_from_logits", "liger triton_grpo_loss"),
        ("grpo_from_logits", "ours one_pass (in-place bwd)"),
        ("grpo_from_logits", "ours fused (in-place)"),
        ("linear_logprobs", "ours (triton tiles)"),
        ("grpo_from_hidden", "liger LigerFusedLinearGRPOLoss"),
    ]:
        assert (op, impl) in impls
    assert all(r["fwdbwd_ms"] is None or r["fwdbwd_ms"] > 0 for r in rows)
    assert any("level=sequence" in r["shape"] for r in rows if r["op"] == "grpo_from_logits")
    assert "| op | shape | impl |" in stdout


@needs_triton
def test_launch_sweep_smoke(tmp_path):
    stdout, result = run_smoke(tmp_path / "sweep.json", "--sweep")
    rows = result["sweep"]
    assert {(r["block_v"], r["num_warps"]) for r in rows} == {(64, 1), (64, 4), (128, 1), (128, 4)}
    assert all(r["fwd_ms"] > 0 and r["bwd_ms"] > 0 for r in rows)
    assert "| BLOCK_V | warps |" in stdout


@needs_triton
def test_grpo_launch_sweep_smoke(tmp_path):
    stdout, result = run_smoke(tmp_path / "sweep_grpo.json", "--sweep-grpo")
    rows = result["sweep_grpo"]
    assert [r for r in rows if "error" in r] == []
    assert {(r["impl"], r["kernel"]) for r in rows} == {("fused", "fused"), ("one_pass", "fwd"), ("one_pass", "bwd")}
    assert {r["programs_per_sm"] for r in rows if r["kernel"] == "fused"} == {0, 1}
    assert all(r["fwdbwd_ms"] > 0 for r in rows) and all(r["fwd_ms"] > 0 for r in rows if r["kernel"] == "fwd")
    assert "| impl | kernel | BLOCK_V |" in stdout
