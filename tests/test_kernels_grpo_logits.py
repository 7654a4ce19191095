"""grpo_loss_from_logits(impl="one_pass" | "fused"): sif_kernels/grpo_logits.py against the fp64 re-statement of TRL's
loss, the torch reference and the default two-kernel path, under TRITON_INTERPRET=1 on CPU (or on CUDA).

Shapes are small (the interpreter runs each program in Python); launch overrides with 16-column blocks and a
persistent grid of a few programs make every row loop, the reversed second pass and the grid-stride loop over
rows run several iterations.
"""

import os

import pytest
import torch
from _grpo_oracle import LOSS_TYPES, VARIANTS, cfg_for, trl_compute_loss

from sif_kernels import GRPOLossConfig, grpo_loss_from_logits
from sif_kernels.grpo_logits import IMPLS, LogitsLaunch, grpo_from_logits_triton
from sif_kernels.grpo_loss import aggregation_scale

HAS_TRITON = torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"
pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="Triton kernels need CUDA or TRITON_INTERPRET=1")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
NEW_IMPLS = ["one_pass", "fused"]
LEVELS = ["token", "sequence"]
# small blocks and persistent grids: V = 37 spans three blocks (the last partial), 2-3 programs loop over rows
SMALL = {
    "fwd": LogitsLaunch(block_v=16, num_warps=1, programs_per_sm=1),
    "bwd": LogitsLaunch(block_v=16, num_warps=1, programs_per_sm=1),
    "fused": LogitsLaunch(block_v=16, num_warps=1, programs_per_sm=1),
    "scale": LogitsLaunch(block_v=16, num_warps=1, programs_per_sm=1),
}


def _problem(b=3, length=5, v=37, dtype=torch.float32, seed=0, temperature=1.0, spread=0.3, float_mask=False):
    """Logits [B, L + 1, V], ids, old/ref near the current log-probs (so clipping and KL are both active), a
    mask with an empty and a truncated completion."""
    gen = torch.Generator().manual_seed(seed)
    full = (torch.randn(b, length + 1, v, generator=gen) * 2).to(dtype)
    ids = torch.randint(0, v, (b, length), generator=gen)
    with torch.no_grad():
        lp = torch.log_softmax(full[:, :-1].double() / temperature, -1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    old = (lp + torch.randn(b, length, generator=gen, dtype=torch.float64) * spread).float()
    ref = (lp + torch.randn(b, length, generator=gen, dtype=torch.float64) * spread).float()
    adv = torch.randn(b, generator=gen)
    if float_mask:
        mask = torch.rand(b, length, generator=gen) * (torch.rand(b, length, generator=gen) > 0.3)
    else:
        mask = torch.ones(b, length, dtype=torch.bool)
        if length > 3:
            mask[min(1, b - 1)] = False
            mask[-1, 3:] = False
    return [t.to(DEVICE) for t in (full, ids, old, ref, adv, mask)]


def _run(impl, full, ids, old, ref, adv, mask, cfg, layout="full", g=1.0, launch=None, inplace=True, **kw):
    """Loss, metrics and the leaf gradient of (g · loss).backward() through one implementation."""
    leaf = full.clone().requires_grad_(True)
    logits = leaf if layout == "full" else leaf[:, :-1]
    if launch is None:
        loss, metrics = grpo_loss_from_logits(
            logits, ids, old, ref, adv, mask, cfg, impl=impl, backend="triton", inplace_backward=inplace, **kw
        )
    else:
        mask_f = mask.float().contiguous()
        scale = aggregation_scale(mask_f, cfg, kw.get("num_items_in_batch"))
        loss, metrics = grpo_from_logits_triton(
            logits, ids, old, ref, adv, mask_f, scale, cfg, impl, inplace, launch=launch
        )
    (loss * g).backward()
    return loss.detach(), metrics, leaf.grad


def _reference(full, ids, old, ref, adv, mask, cfg, g=1.0, num_items_in_batch=None):
    """fp64 TRL loss and metrics and its logits gradient (the last position's gradient is zero)."""
    x64 = full.double().requires_grad_(True)
    lp64 = torch.log_softmax(x64[:, :-1] / cfg.temperature, -1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    loss, metrics = trl_compute_loss(lp64, old, ref, adv, mask, cfg, num_items_in_batch=num_items_in_batch)
    (loss * g).backward()
    return loss.detach(), metrics, x64.grad


def _assert_close(got, want, dtype):
    loss, metrics, grad = got
    ref_loss, ref_metrics, ref_grad = want
    torch.testing.assert_close(loss.double(), ref_loss, atol=1e-5, rtol=1e-4)
    for key, value in ref_metrics.items():
        torch.testing.assert_close(metrics[key].double(), value, atol=1e-5, rtol=1e-4, msg=key)
    assert grad.dtype == dtype
    tol = dict(atol=1e-6, rtol=1e-4) if dtype == torch.float32 else dict(atol=2e-3, rtol=2e-2)
    torch.testing.assert_close(grad.double(), ref_grad, **tol)
    assert (grad[:, -1] == 0).all()


@pytest.mark.parametrize("impl", NEW_IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_matches_trl(loss_type, level, dtype, impl):
    temperature = 0.7
    full, ids, old, ref, adv, mask = _problem(dtype=dtype, seed=LOSS_TYPES.index(loss_type), temperature=temperature)
    cfg = cfg_for(loss_type, level, "delta+kl", temperature=temperature)
    layout = "sliced" if dtype == torch.float32 else "full"
    got = _run(impl, full, ids, old, ref, adv, mask, cfg, layout=layout, num_items_in_batch=9)
    _assert_close(got, _reference(full, ids, old, ref, adv, mask, cfg, num_items_in_batch=9), dtype)
    assert set(got[1]) == {"clip_fraction", "clip_low", "clip_high", "kl"}


@pytest.mark.parametrize("impl", NEW_IMPLS)
@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_small_blocks_and_persistent_grid_match_trl(variant, level, impl):
    """Every loop runs several iterations: three blocks per row, 2 programs over 12 rows, upstream g != 1."""
    full, ids, old, ref, adv, mask = _problem(b=3, length=4, seed=11, spread=0.4)
    old = old if VARIANTS[variant][2] else None
    cfg = cfg_for("bnpo", level, variant)
    got = _run(impl, full, ids, old, ref, adv, mask, cfg, g=0.37, launch=SMALL)
    _assert_close(got, _reference(full, ids, old, ref, adv, mask, cfg, g=0.37), torch.float32)


@pytest.mark.parametrize("impl", NEW_IMPLS)
@pytest.mark.parametrize("level", LEVELS)
def test_equals_two_pass_with_weighted_mask(level, impl):
    """Fractional mask weights (TRL multiplies by the mask) and no log-ratio clamp: the same numbers as the
    default path, which shares the per-token formulas, and as TRL."""
    full, ids, old, ref, adv, mask = _problem(b=4, length=6, seed=3, float_mask=True)
    cfg = GRPOLossConfig(beta=0.1, eps_low=0.2, eps_high=0.28, importance_level=level, log_ratio_clamp=None)
    want = _run("two_pass", full, ids, old, ref, adv, mask, cfg)
    got = _run(impl, full, ids, old, ref, adv, mask, cfg)
    torch.testing.assert_close(got[0], want[0], atol=1e-6, rtol=1e-5)
    for key in want[1]:
        torch.testing.assert_close(got[1][key], want[1][key], atol=1e-6, rtol=1e-5, msg=key)
    torch.testing.assert_close(got[2], want[2], atol=1e-7, rtol=1e-5)
    _assert_close(got, _reference(full, ids, old, ref, adv, mask, cfg), torch.float32)


@pytest.mark.parametrize("impl", NEW_IMPLS)
@pytest.mark.parametrize("g", [1.0, -2.5, 0.0])
def test_upstream_gradient_is_applied(impl, g):
    """The fused backward rescales the forward's gradient only when g != 1; both are exact for any g."""
    full, ids, old, ref, adv, mask = _problem(seed=4)
    cfg = GRPOLossConfig(beta=0.04, eps_high=0.28)
    got = _run(impl, full, ids, old, ref, adv, mask, cfg, g=g, launch=SMALL)
    _assert_close(got, _reference(full, ids, old, ref, adv, mask, cfg, g=g), torch.float32)


@pytest.mark.parametrize("impl", NEW_IMPLS)
def test_gradient_lands_in_the_logits_buffer(impl):
    full, ids, old, ref, adv, mask = _problem(seed=5)
    leaf = full.clone().requires_grad_(True)
    logits = leaf * 1.0  # [B, L + 1, V] activations, as an lm_head would produce
    seen = []
    logits.register_hook(lambda grad: seen.append(grad.data_ptr()))
    cfg = GRPOLossConfig(beta=0.04)
    loss, metrics = grpo_loss_from_logits(logits, ids, old, ref, adv, mask, cfg, impl=impl, backend="triton")
    loss.backward()
    assert seen == [logits.data_ptr()]
    _assert_close((loss.detach(), metrics, leaf.grad), _reference(full, ids, old, ref, adv, mask, cfg), torch.float32)


@pytest.mark.parametrize("impl", NEW_IMPLS)
@pytest.mark.parametrize("level", LEVELS)
def test_out_of_place_leaves_the_logits_alone(impl, level):
    full, ids, old, ref, adv, mask = _problem(seed=6)
    cfg = GRPOLossConfig(beta=0.04, importance_level=level)
    leaf = full.clone().requires_grad_(True)
    loss, metrics = grpo_loss_from_logits(
        leaf, ids, old, ref, adv, mask, cfg, impl=impl, inplace_backward=False, backend="triton"
    )
    loss.backward()
    assert torch.equal(leaf.detach(), full) and leaf.grad.data_ptr() != leaf.data_ptr()
    _assert_close((loss.detach(), metrics, leaf.grad), _reference(full, ids, old, ref, adv, mask, cfg), torch.float32)


def test_fused_overwrites_the_logits_at_the_forward():
    """Token level: the gradient is in the logits right after the forward, and their version is bumped, so an
    autograd use of the old values raises instead of silently reading gradients."""
    full, ids, old, ref, adv, mask = _problem(seed=7)
    cfg = GRPOLossConfig(beta=0.04)
    leaf = full.clone().requires_grad_(True)
    logits = leaf * 1.0
    squared = (logits**2).sum()  # saves logits: its backward must raise
    loss, _ = grpo_loss_from_logits(logits, ids, old, ref, adv, mask, cfg, impl="fused", backend="triton")
    assert not torch.equal(logits.detach(), full)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (loss + squared).backward()


def test_fused_backward_runs_once():
    full, ids, old, ref, adv, mask = _problem(seed=8)
    leaf = full.clone().requires_grad_(True)
    loss, _ = grpo_loss_from_logits(leaf, ids, old, ref, adv, mask, GRPOLossConfig(), impl="fused", backend="triton")
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="only once"):
        loss.backward()


@pytest.mark.parametrize("impl", NEW_IMPLS)
def test_no_grad_forward_writes_nothing(impl):
    full, ids, old, ref, adv, mask = _problem(seed=9)
    cfg = GRPOLossConfig(beta=0.04)
    leaf = full.clone().requires_grad_(True)
    with torch.no_grad():
        loss, metrics = grpo_loss_from_logits(leaf, ids, old, ref, adv, mask, cfg, impl=impl, backend="triton")
    assert torch.equal(leaf.detach(), full) and not loss.requires_grad
    want, want_metrics, _ = _reference(full, ids, old, ref, adv, mask, cfg)
    torch.testing.assert_close(loss.double(), want, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(metrics["kl"].double(), want_metrics["kl"], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("impl", NEW_IMPLS)
@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("shape", [(0, 4), (2, 0), (1, 1)])
def test_empty_and_tiny_inputs(shape, level, impl):
    b, length = shape
    full, ids, old, ref, adv, mask = _problem(b=max(b, 1), length=max(length, 1), v=5, seed=10)
    full, adv = full[:b, : length + 1], adv[:b]
    ids, old, ref, mask = (t[:b, :length] for t in (ids, old, ref, mask))
    cfg = GRPOLossConfig(beta=0.04, importance_level=level)
    loss, metrics, grad = _run(impl, full, ids, old, ref, adv, mask, cfg)
    want = _run("two_pass", full, ids, old, ref, adv, mask, cfg)
    torch.testing.assert_close(loss, want[0], atol=1e-6, rtol=1e-5)
    assert grad.shape == full.shape
    torch.testing.assert_close(grad, want[2], atol=1e-6, rtol=1e-5)
    for key in want[1]:
        torch.testing.assert_close(metrics[key], want[1][key], equal_nan=True, msg=key)  # B = 0: NaN means


@pytest.mark.parametrize("impl", NEW_IMPLS)
def test_all_masked_gives_zero_loss_and_gradient(impl):
    full, ids, old, ref, adv, mask = _problem(seed=12)
    loss, metrics, grad = _run(impl, full, ids, old, ref, adv, torch.zeros_like(mask), GRPOLossConfig(), g=3.0)
    assert float(loss) == 0.0 and (grad == 0).all() and float(metrics["kl"]) == 0.0


def test_bad_impl_and_launch_raise():
    full, ids, old, ref, adv, mask = _problem()
    with pytest.raises(ValueError, match="impl must be one of"):
        grpo_loss_from_logits(full, ids, old, ref, adv, mask, GRPOLossConfig(), impl="three_pass")
    with pytest.raises(ValueError, match="power of two"):
        LogitsLaunch(block_v=100, num_warps=4)
    assert IMPLS[0] == "two_pass"


@pytest.mark.gpu
@pytest.mark.parametrize("impl", NEW_IMPLS)
@pytest.mark.parametrize("level", LEVELS)
def test_realistic_vocabulary_matches_two_pass_on_gpu(level, impl):
    """bf16 logits of a Qwen-sized vocabulary at the default launch configurations: the same loss, metrics and
    gradient as the measured default path."""
    torch.manual_seed(0)
    b, length, v = 4, 256, 151936
    full = torch.randn(b, length + 1, v, device="cuda", dtype=torch.bfloat16)
    ids = torch.randint(0, v, (b, length), device="cuda")
    with torch.no_grad():
        lp = torch.log_softmax(full[:, :-1].float(), -1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    old, ref = lp + 0.3 * torch.randn_like(lp), lp + 0.3 * torch.randn_like(lp)
    adv = torch.randn(b, device="cuda")
    mask = torch.ones(b, length, dtype=torch.bool, device="cuda")
    mask[:, 200:] = False
    cfg = GRPOLossConfig(beta=0.04, eps_high=0.28, importance_level=level)
    want = _run("two_pass", full, ids, old, ref, adv, mask, cfg, g=0.5)
    got = _run(impl, full, ids, old, ref, adv, mask, cfg, g=0.5)
    torch.testing.assert_close(got[0], want[0], atol=1e-5, rtol=1e-5)
    for key in want[1]:
        torch.testing.assert_close(got[1][key], want[1][key], atol=1e-6, rtol=1e-5, msg=key)
    torch.testing.assert_close(got[2].float(), want[2].float(), atol=1e-6, rtol=1e-2)


@pytest.mark.gpu
def test_new_kernels_do_not_recompile_per_hyper_parameter():
    from sif_kernels.grpo_logits import _grpo_logits_bwd_kernel, _grpo_logits_fwd_kernel, _scale_grad_kernel

    kernels = (_grpo_logits_fwd_kernel, _grpo_logits_bwd_kernel, _scale_grad_kernel)

    def compiled_variants() -> int:
        return sum(len(cache[0]) for k in kernels for cache in k.device_caches.values())

    full, ids, old, ref, adv, mask = _problem(b=4, length=9, v=50)

    def step(cfg):
        for impl in NEW_IMPLS:
            _run(impl, full, ids, old, ref, adv, mask, cfg, g=0.5)

    step(GRPOLossConfig(beta=0.04, eps_low=0.2, temperature=1.0))
    compiled = compiled_variants()
    assert compiled >= 3
    for beta, eps, delta, temperature in [(0.1, 0.1, 2.0, 0.7), (0.5, 0.3, None, 1.3), (0.01, 0.05, 1.5, 0.9)]:
        step(GRPOLossConfig(beta=beta, eps_low=eps, eps_high=eps, delta=delta, temperature=temperature))
    assert compiled_variants() == compiled
