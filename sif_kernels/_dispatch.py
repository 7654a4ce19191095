"""Backend selection and input checks shared by the kernels in this package.

Every public op takes ``backend``: ``"triton"`` runs the Triton kernels (CUDA tensors, or CPU tensors under
``TRITON_INTERPRET=1``), ``"torch"`` runs the plain PyTorch reference, ``None`` picks Triton for CUDA tensors and
the reference otherwise.
"""

from __future__ import annotations

import os

import torch

BACKENDS = ("triton", "torch")


def interpreter_enabled() -> bool:
    """True when Triton runs kernels on CPU tensors through its interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def resolve_backend(backend: str | None, tensor: torch.Tensor, op: str) -> str:
    """Return the backend ``op`` runs on for ``tensor``; raise on a backend that cannot run there."""
    if backend is None:
        return "triton" if tensor.is_cuda else "torch"
    if backend not in BACKENDS:
        raise ValueError(f"{op}: backend must be one of {BACKENDS} or None, got {backend!r}")
    if backend == "triton" and not tensor.is_cuda and not interpreter_enabled():
        raise RuntimeError(f"{op}: backend='triton' needs CUDA tensors or TRITON_INTERPRET=1 for CPU tensors")
    return backend


def check_targets(target: torch.Tensor, n: int, vocab: int, device: torch.device, op: str) -> None:
    """Check ``target`` is an integer vector of length ``n`` on ``device`` with values in [0, vocab).

    The range check synchronises on CPU only; on CUDA it is an asynchronous device assertion.
    """
    if target.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{op}: target must be int64 or int32, got {target.dtype}")
    if target.dim() != 1 or target.shape[0] != n:
        raise ValueError(f"{op}: target must have shape [{n}], got {list(target.shape)}")
    if target.device != device:
        raise ValueError(f"{op}: target is on {target.device} but the scores are on {device}")
    if n == 0:
        return
    in_range = ((target >= 0) & (target < vocab)).all()
    if target.is_cuda:
        torch._assert_async(in_range, f"{op}: target values must lie in [0, {vocab})")
    elif not bool(in_range):
        bad = int(torch.nonzero((target < 0) | (target >= vocab))[0, 0])
        raise ValueError(f"{op}: target[{bad}] = {int(target[bad])} is outside the vocabulary [0, {vocab})")


def check_float(t: torch.Tensor, name: str, op: str) -> None:
    """Raise unless ``t`` is a floating-point tensor of a dtype the kernels read (fp32, bf16, fp16)."""
    if t.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"{op}: {name} must be float32, bfloat16 or float16, got {t.dtype}")


def check_temperature(temperature: float, op: str) -> None:
    if not temperature > 0.0:
        raise ValueError(f"{op}: temperature must be > 0, got {temperature}")
