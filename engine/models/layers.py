"""Shared building blocks: RMSNorm and the SwiGLU MLP, with Liger kernels on CUDA.

Liger is imported lazily and only for CUDA tensors; CPU (and any tensor when Liger is absent) uses the torch
expressions below, which are the reference numerics (fp32 normalisation, cast back before the weight).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn


@functools.cache
def _liger():
    try:
        from liger_kernel.ops.rms_norm import LigerRMSNormFunction
        from liger_kernel.ops.swiglu import LigerSiLUMulFunction
    except ImportError:
        return None
    return LigerRMSNormFunction, LigerSiLUMulFunction


class RMSNorm(nn.Module):
    """x [..., H] → weight * x / rms(x) (statistics in fp32, Qwen/Llama casting order)."""

    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        liger = _liger() if x.is_cuda else None
        if liger is not None:
            return liger[0].apply(x, self.weight, self.eps, 0.0, "llama", False)
        dtype = x.dtype
        xf = x.to(torch.float32)
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(dtype)


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)); biases optional (the vision MLP has them, the decoder's does not)."""

    def __init__(self, hidden_size: int, intermediate_size: int, bias: bool) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_proj(x), self.up_proj(x)
        liger = _liger() if x.is_cuda else None
        act = liger[1].apply(gate, up) if liger is not None else F.silu(gate) * up
        return self.down_proj(act)
