"""Packed attention and the training path: varlen attention vs a dense masked reference, gradients, checkpointing."""

import pytest
import torch
import torch.nn.functional as F

from engine.models import create_tiny_checkpoint, from_pretrained, mrope_position_ids
from engine.models.attention import varlen_attention
from engine.models.vision import window_index


def dense_reference(q, k, v, cu, causal):
    """Every token against every token with an explicit block-diagonal (and causal) mask, GQA by repetition."""
    t = q.shape[0]
    seg = torch.repeat_interleave(torch.arange(len(cu) - 1), cu[1:] - cu[:-1])
    mask = seg[:, None] == seg[None, :]
    if causal:
        mask &= torch.ones(t, t, dtype=torch.bool).tril()
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    scores = torch.einsum("qhd,khd->hqk", q, k) / q.shape[-1] ** 0.5
    probs = scores.masked_fill(~mask, float("-inf")).softmax(-1)
    return torch.einsum("hqk,khd->qhd", probs, v)


@pytest.mark.parametrize("causal", [True, False])
def test_varlen_matches_dense(causal):
    gen = torch.Generator().manual_seed(0)
    lens = torch.tensor([5, 1, 7, 5, 0, 12, 5])  # repeated lengths share one SDPA batch; an empty sequence
    cu = F.pad(torch.cumsum(lens, 0), (1, 0)).to(torch.int32)
    t = int(lens.sum())
    q = torch.randn(t, 4, 8, generator=gen, requires_grad=True)
    k = torch.randn(t, 2, 8, generator=gen, requires_grad=True)
    v = torch.randn(t, 2, 8, generator=gen, requires_grad=True)
    out = varlen_attention(q, k, v, cu, causal=causal)
    ref = dense_reference(q, k, v, cu, causal)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    g = torch.randn(out.shape, generator=gen)
    grads = torch.autograd.grad(out, (q, k, v), g)
    ref_grads = torch.autograd.grad(ref, (q, k, v), g)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_window_index_partitions_image():
    """Windows cover every merge-unit exactly once; border windows are smaller; windows never span images."""
    from engine.models import VisionConfig

    cfg = VisionConfig(window_size=56, patch_size=14, spatial_merge_size=2)
    grid = torch.tensor([[1, 6, 10], [1, 4, 4]])  # 3x5 and 2x2 merge-units, window 2x2 merge-units
    order, cu = window_index(grid, cfg)
    assert sorted(order.tolist()) == list(range(19))
    sizes = ((cu[1:] - cu[:-1]) // 4).tolist()
    assert sizes == [4, 4, 2, 2, 2, 1, 4]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return from_pretrained(create_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "ckpt", seed=0))


def packed_batch(model):
    gen = torch.Generator().manual_seed(1)
    cfg = model.config
    grid = torch.tensor([[1, 4, 4]])
    seqs = [
        torch.randint(0, 256, (7,), generator=gen),
        torch.tensor([1, 2, cfg.vision_start_token_id] + [cfg.image_token_id] * 4 + [cfg.vision_end_token_id, 3]),
    ]
    pos = torch.cat([mrope_position_ids(seqs[0], None, cfg), mrope_position_ids(seqs[1], grid, cfg)], dim=1)
    cu = torch.tensor([0, 7, 7 + len(seqs[1])], dtype=torch.int32)
    pv = torch.randn(16, cfg.vision.patch_dim, generator=gen)
    return torch.cat(seqs), pos, cu, pv, grid


def test_packed_forward_equals_separate_forwards(model):
    ids, pos, cu, pv, grid = packed_batch(model)
    with torch.no_grad():
        packed = model.forward_packed(ids, pos, cu, pv, grid)
        a = model.forward_packed(ids[:7], pos[:, :7], torch.tensor([0, 7], dtype=torch.int32))
        b = model.forward_packed(ids[7:], pos[:, 7:], torch.tensor([0, len(ids) - 7], dtype=torch.int32), pv, grid)
    torch.testing.assert_close(packed, torch.cat([a, b]), atol=1e-5, rtol=0)


def test_activation_checkpointing_same_gradients(model):
    ids, pos, cu, pv, grid = packed_batch(model)
    grads = []
    for ckpt in (False, True):
        model.zero_grad()
        model.set_gradient_checkpointing(ckpt)
        hidden = model.forward_packed(ids, pos, cu, pv, grid)
        (hidden @ model.lm_head_weight.T).logsumexp(-1).sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    model.set_gradient_checkpointing(False)
    assert grads[0]["visual.blocks.0.attn.qkv.weight"].abs().sum() > 0  # the vision tower is trained too
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.gpu
def test_cuda_bf16_path_matches_cpu_fp32(model):
    """CUDA path (Liger RMSNorm/SwiGLU/RoPE, flash-attn varlen when installed) in bf16 against the CPU fp32 path."""
    import copy

    ids, pos, cu, pv, grid = packed_batch(model)
    with torch.no_grad():
        ref = model.forward_packed(ids, pos, cu, pv, grid)
    gpu = copy.deepcopy(model).to("cuda", torch.bfloat16)
    hidden = gpu.forward_packed(ids.cuda(), pos.cuda(), cu.cuda(), pv.cuda(), grid)
    hidden.float().square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in gpu.parameters())
    err = (hidden.float().cpu() - ref).norm() / ref.norm()
    assert err < 2e-2, err
