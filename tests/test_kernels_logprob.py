"""sif_kernels.token_logprobs: Triton path (CUDA, or CPU under TRITON_INTERPRET=1) and reference vs an fp64 oracle."""

import os

import pytest
import torch
from hypothesis import Phase, given, settings
from hypothesis import strategies as st

from sif_kernels import token_logprobs
from sif_kernels.logprob import logprob_bwd_triton, logprob_fwd_triton, token_logprobs_reference

HAS_TRITON = torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="Triton kernels need CUDA or TRITON_INTERPRET=1")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: dict(atol=2e-5, rtol=1e-5), torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}


def oracle(logits: torch.Tensor, target: torch.Tensor, temperature: float):
    """fp64 log_softmax gather and entropy (0·log 0 taken as 0)."""
    logp_all = torch.log_softmax(logits.double() / temperature, dim=-1)
    p = logp_all.exp()
    ent = -torch.where(p > 0, p * logp_all, torch.zeros_like(p)).sum(-1)
    return logp_all.gather(-1, target.long().unsqueeze(-1)).squeeze(-1), ent


def check_against_oracle(logits, target, temperature, dtype, inplace=False):
    x = logits.detach().clone().requires_grad_(True)
    lp, ent = token_logprobs(x, target, temperature, True, inplace_backward=inplace, backend="triton")
    assert lp.dtype == torch.float32 and ent.dtype == torch.float32
    assert lp.shape == target.shape and ent.shape == target.shape
    x64 = logits.detach().double().requires_grad_(True)
    lp_ref, ent_ref = oracle(x64, target, temperature)
    # fp32 rounding of the log-sum-exp grows with the magnitude of the scaled logits
    magnitude = 1.0 + (float(logits.abs().max()) / temperature if logits.numel() else 0.0)
    atol = max(2e-5, 2e-7 * magnitude)
    torch.testing.assert_close(lp.double(), lp_ref.detach(), atol=atol, rtol=1e-5, check_dtype=False)
    torch.testing.assert_close(ent.double(), ent_ref.detach(), atol=2.5 * atol, rtol=1e-5, check_dtype=False)
    g_lp, g_ent = torch.randn_like(lp), torch.randn_like(ent)
    (lp * g_lp + ent * g_ent).sum().backward()
    (lp_ref * g_lp.double() + ent_ref * g_ent.double()).sum().backward()
    assert x.grad.dtype == dtype
    tol = dict(TOL[dtype])
    if dtype == torch.float32 and lp.numel():
        g_max = float(torch.cat([g_lp, g_ent]).abs().max())
        tol["atol"] = max(tol["atol"], 2e-7 * magnitude * g_max / temperature)
    torch.testing.assert_close(x.grad.double(), x64.grad, **tol, check_dtype=False)
    return x


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("n,v", [(1, 1), (5, 37), (3, 5000)])
def test_values_and_grads_match_oracle(n, v, temperature, dtype):
    torch.manual_seed(n * 100 + v)
    logits = (torch.randn(n, v, device=DEVICE) * 3).to(dtype)
    target = torch.randint(0, v, (n,), device=DEVICE)
    check_against_oracle(logits, target, temperature, dtype)


@needs_triton
@pytest.mark.parametrize("v", [151936, 129920])
def test_real_vocab_sizes_tail_is_masked(v):
    torch.manual_seed(v)
    logits = torch.randn(2, v, device=DEVICE).to(torch.bfloat16)
    target = torch.tensor([v - 1, 3], device=DEVICE)
    lp, ent = token_logprobs(logits, target, 1.0, True, backend="triton")
    lp_ref, ent_ref = oracle(logits, target, 1.0)
    torch.testing.assert_close(lp.double(), lp_ref, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(ent.double(), ent_ref, atol=1e-4, rtol=1e-5)


@needs_triton
def test_zero_rows():
    logits = torch.randn(0, 19, device=DEVICE, requires_grad=True)
    lp, ent = token_logprobs(logits, torch.zeros(0, dtype=torch.long, device=DEVICE), 1.0, True, backend="triton")
    assert lp.shape == (0,) and ent.shape == (0,)
    (lp.sum() + ent.sum()).backward()
    assert logits.grad.shape == (0, 19)


@needs_triton
def test_strided_rows_3d_shifted_view_and_int32_targets():
    torch.manual_seed(1)
    full = torch.randn(2, 6, 41, device=DEVICE)
    target = torch.randint(0, 41, (2, 5), device=DEVICE, dtype=torch.int32)
    x = check_against_oracle(full[:, :-1], target, 0.9, torch.float32)
    assert x.grad.shape == (2, 5, 41)
    padded = torch.randn(4, 50, device=DEVICE)[:, :41]  # row stride 50 != V
    check_against_oracle(padded, torch.randint(0, 41, (4,), device=DEVICE), 1.0, torch.float32)


@needs_triton
def test_non_unit_vocab_stride_is_handled():
    torch.manual_seed(2)
    logits = torch.randn(23, 6, device=DEVICE).T  # [6, 23] with stride (1, 6)
    check_against_oracle(logits, torch.randint(0, 23, (6,), device=DEVICE), 1.0, torch.float32)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_inplace_backward_writes_gradient_into_logits(dtype):
    torch.manual_seed(3)
    base = (torch.randn(7, 33, device=DEVICE) * 2).to(dtype)
    target = torch.randint(0, 33, (7,), device=DEVICE)
    expected = base.clone().requires_grad_(True)
    token_logprobs(expected, target, 0.8, backend="triton").sum().backward()
    leaf = base.clone().requires_grad_(True)
    logits = leaf * 1  # non-leaf buffer the backward may overwrite
    lp = token_logprobs(logits, target, 0.8, inplace_backward=True, backend="triton")
    seen = []
    logits.register_hook(lambda g: seen.append(g.data_ptr()))
    lp.sum().backward()
    assert seen == [logits.data_ptr()]
    torch.testing.assert_close(logits.detach(), expected.grad)
    torch.testing.assert_close(leaf.grad, expected.grad)
    # on a leaf the written buffer becomes .grad itself: no N×V clone in AccumulateGrad
    own = base.clone().requires_grad_(True)
    token_logprobs(own, target, 0.8, inplace_backward=True, backend="triton").sum().backward()
    assert own.grad.data_ptr() == own.data_ptr()
    torch.testing.assert_close(own.grad, expected.grad)


@needs_triton
def test_negative_infinite_logits_stay_finite():
    logits = torch.randn(3, 17, device=DEVICE)
    logits[:, 5:9] = float("-inf")
    target = torch.tensor([0, 4, 16], device=DEVICE)
    x = logits.clone().requires_grad_(True)
    lp, ent = token_logprobs(x, target, 1.0, True, backend="triton")
    lp_ref, ent_ref = oracle(logits, target, 1.0)
    torch.testing.assert_close(lp.double(), lp_ref, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(ent.double(), ent_ref, atol=2e-5, rtol=1e-5)
    (lp + ent).sum().backward()
    assert torch.isfinite(x.grad).all() and (x.grad[:, 5:9] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reference_backend_matches_oracle(dtype):
    torch.manual_seed(4)
    logits = torch.randn(6, 29).to(dtype).requires_grad_(True)
    target = torch.randint(0, 29, (6,))
    lp, ent = token_logprobs(logits, target, 0.6, True)  # CPU tensors dispatch to the reference
    lp_ref, ent_ref = oracle(logits.detach(), target, 0.6)
    torch.testing.assert_close(lp.double(), lp_ref, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(ent.double(), ent_ref, atol=2e-5, rtol=1e-5)
    assert token_logprobs_reference(logits, target).dtype == torch.float32


def test_bad_inputs_raise_clear_errors():
    logits = torch.randn(4, 10)
    with pytest.raises(ValueError, match=r"target\[2\] = 10 is outside"):
        token_logprobs(logits, torch.tensor([0, 1, 10, 3]))
    with pytest.raises(ValueError, match="target\\[0\\] = -1"):
        token_logprobs(logits, torch.tensor([-1, 1, 2, 3]))
    with pytest.raises(ValueError, match="target shape"):
        token_logprobs(logits, torch.tensor([0, 1, 2]))
    with pytest.raises(TypeError, match="target must be int64 or int32"):
        token_logprobs(logits, torch.zeros(4))
    with pytest.raises(TypeError, match="logits must be float32, bfloat16 or float16"):
        token_logprobs(torch.zeros(4, 10, dtype=torch.int64), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="temperature must be > 0"):
        token_logprobs(logits, torch.zeros(4, dtype=torch.long), temperature=0.0)
    with pytest.raises(ValueError, match="backend must be one of"):
        token_logprobs(logits, torch.zeros(4, dtype=torch.long), backend="cuda")
    with pytest.raises(ValueError, match="target is on meta but the scores are on cpu"):
        token_logprobs(logits, torch.zeros(4, dtype=torch.long, device="meta"))
    with pytest.raises(ValueError, match=r"logits must be \[N, V\] or \[B, L, V\]"):
        token_logprobs(torch.randn(10), torch.zeros((), dtype=torch.long))


@needs_triton
@settings(max_examples=12, deadline=None, phases=(Phase.explicit, Phase.reuse, Phase.generate))
@given(
    n=st.integers(0, 9),
    v=st.integers(1, 300),
    temperature=st.floats(0.3, 2.0),
    scale=st.floats(0.1, 20.0),
    seed=st.integers(0, 2**16),
)
def test_property_random_shapes(n, v, temperature, scale, seed):
    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn(n, v, generator=gen) * scale).to(DEVICE)
    target = torch.randint(0, v, (n,), generator=gen).to(DEVICE)
    check_against_oracle(logits, target, temperature, torch.float32)


@needs_triton
@pytest.mark.parametrize("block_v, num_warps", [(64, 1), (128, 2), (512, 8)])
def test_launch_overrides_give_the_same_logprobs_and_gradient(block_v, num_warps):
    """The benchmark's launch sweep is only meaningful if every configuration computes the same thing."""
    gen = torch.Generator().manual_seed(3)
    logits = (torch.randn(5, 300, generator=gen) * 3).to(DEVICE)
    target = torch.randint(0, 300, (5,), generator=gen).to(DEVICE)
    g = torch.randn(5, generator=gen).to(DEVICE)
    launch = {"block_v": block_v, "num_warps": num_warps}
    logp, lse, ent = logprob_fwd_triton(logits, target, 0.7, True, **launch)
    grad = logprob_bwd_triton(logits, target, lse, ent, g, None, 0.7, torch.empty_like(logits), **launch)
    x = logits.double().requires_grad_(True)
    lp_ref, _ = oracle(x, target, 0.7)
    (grad_ref,) = torch.autograd.grad((lp_ref * g.double()).sum(), x)
    torch.testing.assert_close(logp.double(), lp_ref.detach(), atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(grad.double(), grad_ref, atol=2e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="power of two"):
        logprob_fwd_triton(logits, target, 0.7, False, block_v=96)
