"""sif_kernels.linear_token_logprobs (Triton tiles and the chunked torch reference) vs materialised fp64 logits."""

import os

import pytest
import torch
from hypothesis import Phase, given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

from sif_kernels import linear_token_logprobs
from sif_kernels.linear_logprob import linear_token_logprobs_reference

HAS_TRITON = torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="Triton kernels need CUDA or TRITON_INTERPRET=1")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = [pytest.param("triton", marks=needs_triton), "torch"]


def oracle(hidden, weight, target, temperature):
    """Materialised fp64 logits → log_softmax gather and entropy."""
    logp_all = torch.log_softmax((hidden.double() @ weight.double().T) / temperature, dim=-1)
    return logp_all.gather(1, target.long().unsqueeze(1)).squeeze(1), -(logp_all.exp() * logp_all).sum(-1)


def run_and_compare(n, h, v, temperature, backend, dtype=torch.float32, seed=0, tol=None, **chunks):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=gen).to(DEVICE, dtype)
    weight = (torch.randn(v, h, generator=gen) / h**0.5).to(DEVICE, dtype)
    target = torch.randint(0, v, (n,), generator=gen).to(DEVICE)
    g_lp, g_ent = torch.randn(n, generator=gen).to(DEVICE), torch.randn(n, generator=gen).to(DEVICE)
    hx, wx = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    lp, ent = linear_token_logprobs(hx, wx, target, temperature, True, backend=backend, **chunks)
    assert lp.dtype == torch.float32 and lp.shape == (n,) and ent.shape == (n,)
    (lp * g_lp + ent * g_ent).sum().backward()
    h64, w64 = hidden.double().requires_grad_(True), weight.double().requires_grad_(True)
    lp_ref, ent_ref = oracle(h64, w64, target, temperature)
    (lp_ref * g_lp.double() + ent_ref * g_ent.double()).sum().backward()
    tol = tol or dict(atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lp.double(), lp_ref.detach(), **tol)
    torch.testing.assert_close(ent.double(), ent_ref.detach(), **tol)
    assert hx.grad.dtype == dtype and wx.grad.dtype == dtype
    torch.testing.assert_close(hx.grad.double(), h64.grad, **tol)
    torch.testing.assert_close(wx.grad.double(), w64.grad, **tol)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize(
    "n,h,v,chunks",
    [
        (7, 5, 23, dict(chunk_tokens=3, chunk_vocab=7)),  # ragged token and vocab chunks
        (1, 8, 1, {}),
        (9, 16, 130, dict(chunk_vocab=64)),
        (5, 4, 4100, {}),  # vocab tail past the kernel block
    ],
)
def test_matches_materialised_logits(n, h, v, chunks, temperature, backend):
    run_and_compare(n, h, v, temperature, backend, seed=n + v, **chunks)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_inputs(backend):
    run_and_compare(6, 32, 77, 1.0, backend, dtype=torch.bfloat16, tol=dict(atol=3e-2, rtol=3e-2), chunk_vocab=32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_tokens(backend):
    hidden = torch.randn(0, 6, device=DEVICE, requires_grad=True)
    weight = torch.randn(11, 6, device=DEVICE, requires_grad=True)
    lp = linear_token_logprobs(hidden, weight, torch.zeros(0, dtype=torch.long, device=DEVICE), backend=backend)
    assert lp.shape == (0,)
    lp.sum().backward()
    assert hidden.grad.shape == (0, 6) and (weight.grad == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_only_hidden_requires_grad_and_strided_weight(backend):
    torch.manual_seed(5)
    hidden = torch.randn(6, 12, device=DEVICE, requires_grad=True)
    weight = torch.randn(12, 40, device=DEVICE).T  # [40, 12] non-contiguous, e.g. a transposed tied matrix
    target = torch.randint(0, 40, (6,), device=DEVICE)
    lp = linear_token_logprobs(hidden, weight, target, 0.9, backend=backend, chunk_tokens=4, chunk_vocab=16)
    lp.sum().backward()
    h64 = hidden.detach().double().requires_grad_(True)
    oracle(h64, weight, target, 0.9)[0].sum().backward()
    torch.testing.assert_close(hidden.grad.double(), h64.grad, atol=1e-5, rtol=1e-5)


class _LargestAllocation(TorchDispatchMode):
    """Records the largest tensor (in elements) any op produces while active."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_reference_never_materialises_the_logits():
    n, h, v = 256, 8, 4096
    hidden = torch.randn(n, h, requires_grad=True)
    weight = torch.randn(v, h, requires_grad=True)
    target = torch.randint(0, v, (n,))
    with _LargestAllocation() as probe:
        lp, ent = linear_token_logprobs_reference(hidden, weight, target, 1.0, True, chunk_tokens=32)
        (lp.sum() + ent.sum()).backward()
    assert probe.largest <= 32 * v, f"largest intermediate has {probe.largest} elements; N×V = {n * v}"


def test_default_cpu_chunk_bounds_the_tile():
    n, v = 2048, 16384
    hidden, weight = torch.randn(n, 4), torch.randn(v, 4)
    with _LargestAllocation() as probe:
        linear_token_logprobs(hidden, weight, torch.randint(0, v, (n,)))
    assert probe.largest <= n * v // 4


def test_bad_inputs_raise_clear_errors():
    hidden, weight = torch.randn(4, 6), torch.randn(10, 6)
    with pytest.raises(ValueError, match=r"need hidden \[N, H\] and weight \[V, H\]"):
        linear_token_logprobs(hidden, torch.randn(10, 5), torch.zeros(4, dtype=torch.long))
    with pytest.raises(TypeError, match="weight dtype"):
        linear_token_logprobs(hidden, weight.double(), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"target\[3\] = 10 is outside"):
        linear_token_logprobs(hidden, weight, torch.tensor([0, 1, 2, 10]))
    with pytest.raises(ValueError, match=r"target must have shape \[4\]"):
        linear_token_logprobs(hidden, weight, torch.tensor([0, 1]))


@needs_triton
@settings(max_examples=10, deadline=None, phases=(Phase.explicit, Phase.reuse, Phase.generate))
@given(
    n=st.integers(0, 10),
    h=st.integers(1, 12),
    v=st.integers(1, 90),
    chunk_tokens=st.integers(1, 8),
    chunk_vocab=st.integers(1, 40),
    temperature=st.floats(0.5, 1.5),
    seed=st.integers(0, 2**16),
)
def test_property_triton_tiles(n, h, v, chunk_tokens, chunk_vocab, temperature, seed):
    run_and_compare(n, h, v, temperature, "triton", seed=seed, chunk_tokens=chunk_tokens, chunk_vocab=chunk_vocab)
