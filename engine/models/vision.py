"""The Qwen2.5-VL vision tower: patches → ViT blocks (window or full attention, 2-D RoPE) → 2×2 patch merger.

Input: ``pixel_values`` float [P, C*2*14*14] (P patches of all images, in processor order) and ``grid_thw``
int [n, 3] (patch grid per image). Output: float [P / 4, out_hidden_size], one row per LLM image token, in the
order the image pads appear in the text.

Window attention: merged tokens are regrouped into windows of ``window_size`` pixels (8×8 patches for 112 px) so
that most blocks attend within a window; blocks listed in ``fullatt_block_indexes`` attend over the whole image.
The regrouping is a permutation of merge-units applied once before the blocks and undone after the merger.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .attention import varlen_attention
from .config import VisionConfig
from .layers import RMSNorm, SwiGLU
from .rope import vision_cos_sin


def window_index(grid_thw: torch.Tensor, cfg: VisionConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Permutation of merge-units into window order, int64 [P/merge²], and the windows' cu_seqlens in patches.

    Windows at the right/bottom border are smaller (the grid is not padded); empty windows are dropped.
    """
    merge = cfg.spatial_merge_size
    win = cfg.window_size // merge // cfg.patch_size
    unit = merge * merge
    order, bounds, offset = [], [0], 0
    for t, h, w in grid_thw.tolist():
        gh, gw = h // merge, w // merge
        idx = torch.arange(t * gh * gw).view(t, gh, gw)
        nh, nw = -(-gh // win), -(-gw // win)
        idx = F.pad(idx, (0, nw * win - gw, 0, nh * win - gh), value=-1)
        idx = idx.view(t, nh, win, nw, win).permute(0, 1, 3, 2, 4).reshape(t * nh * nw, win * win)
        valid = idx >= 0
        order.append(idx[valid] + offset)
        sizes = valid.sum(1)
        bounds.extend((torch.cumsum(sizes[sizes > 0], 0) * unit + bounds[-1]).tolist())
        offset += t * gh * gw
    return torch.cat(order), torch.tensor(bounds, dtype=torch.int32)


def image_cu_seqlens(grid_thw: torch.Tensor) -> torch.Tensor:
    """cu_seqlens int32 [n*t+1] of the full-attention blocks: one sequence per frame of each image."""
    lens = (grid_thw[:, 1] * grid_thw[:, 2]).repeat_interleave(grid_thw[:, 0])
    return F.pad(torch.cumsum(lens, 0), (1, 0)).to(torch.int32)


class VisionAttention(nn.Module):
    """Bidirectional multi-head attention with fused qkv (bias) and 2-D RoPE applied in fp32."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        self.proj = nn.Linear(dim, dim, bias=True)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        q, k, v = self.qkv(x).view(n, 3, self.num_heads, -1).unbind(1)
        c, s = cos.unsqueeze(1), sin.unsqueeze(1)
        qf, kf = q.float(), k.float()
        half = qf.shape[-1] // 2
        rot = lambda t: torch.cat((-t[..., half:], t[..., :half]), dim=-1)
        q = (qf * c + rot(qf) * s).to(v.dtype)
        k = (kf * c + rot(kf) * s).to(v.dtype)
        out = varlen_attention(q, k, v, cu_seqlens, causal=False)
        return self.proj(out.reshape(n, -1))


class VisionBlock(nn.Module):
    """Pre-norm ViT block: x + attn(norm1(x)); x + swiglu(norm2(x))."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.norm1 = RMSNorm(cfg.hidden_size, eps=1e-6)
        self.norm2 = RMSNorm(cfg.hidden_size, eps=1e-6)
        self.attn = VisionAttention(cfg.hidden_size, cfg.num_heads)
        self.mlp = SwiGLU(cfg.hidden_size, cfg.intermediate_size, bias=True)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), cos, sin, cu_seqlens)
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    """Conv3d with kernel = stride = (2, 14, 14) and no bias, computed as one matmul over flattened patches.

    The weight keeps the checkpoint's Conv3d shape [E, C, 2, 14, 14] so that loading/saving needs no reshape.
    """

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        p, tp = cfg.patch_size, cfg.temporal_patch_size
        self.proj = nn.Module()
        self.proj.weight = nn.Parameter(torch.empty(cfg.hidden_size, cfg.in_channels, tp, p, p))

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        w = self.proj.weight
        return F.linear(pixel_values.to(w.dtype), w.view(w.shape[0], -1))


class PatchMerger(nn.Module):
    """RMSNorm, then each run of merge² patches concatenated → Linear → GELU → Linear to the LLM width."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.in_dim = cfg.hidden_size * cfg.spatial_merge_size**2
        self.ln_q = RMSNorm(cfg.hidden_size, eps=1e-6)
        self.mlp = nn.Sequential(
            nn.Linear(self.in_dim, self.in_dim), nn.GELU(), nn.Linear(self.in_dim, cfg.out_hidden_size)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.ln_q(x).view(-1, self.in_dim))


class VisionTower(nn.Module):
    """pixel_values [P, patch_dim], grid_thw [n, 3] → image token embeddings [P/merge², out_hidden_size]."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.patch_embed = PatchEmbed(cfg)
        self.blocks = nn.ModuleList(VisionBlock(cfg) for _ in range(cfg.depth))
        self.merger = PatchMerger(cfg)
        self.gradient_checkpointing = False

    def forward(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        grid_thw = grid_thw.to("cpu", torch.long)
        n_patches = int(grid_thw.prod(-1).sum())
        if pixel_values.shape != (n_patches, cfg.patch_dim):
            raise ValueError(
                f"vision: pixel_values has shape {tuple(pixel_values.shape)}, image_grid_thw {grid_thw.tolist()} "
                f"needs ({n_patches}, {cfg.patch_dim})"
            )
        if ((grid_thw[:, 1:] % cfg.spatial_merge_size) != 0).any():
            raise ValueError(f"vision: grid h/w must be multiples of {cfg.spatial_merge_size}, got {grid_thw.tolist()}")
        device = pixel_values.device
        unit = cfg.spatial_merge_size**2
        order, cu_windows = window_index(grid_thw, cfg)
        order = order.to(device)
        cu_full = image_cu_seqlens(grid_thw)

        x = self.patch_embed(pixel_values)
        x = x.view(-1, unit, x.shape[-1])[order].view(n_patches, -1)
        cos, sin = vision_cos_sin(grid_thw, cfg.head_dim, cfg.rope_theta, cfg.spatial_merge_size, device)
        cos = cos.view(-1, unit, cos.shape[-1])[order].view(n_patches, -1)
        sin = sin.view(-1, unit, sin.shape[-1])[order].view(n_patches, -1)
        full = set(cfg.fullatt_block_indexes)
        for i, blk in enumerate(self.blocks):
            cu = cu_full if i in full else cu_windows
            if self.gradient_checkpointing and torch.is_grad_enabled():
                x = checkpoint(blk, x, cos, sin, cu, use_reentrant=False)
            else:
                x = blk(x, cos, sin, cu)
        x = self.merger(x)
        return x[torch.argsort(order)]
