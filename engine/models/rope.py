"""Rotary embeddings: the decoder's multimodal RoPE (M-RoPE) and the vision tower's 2-D RoPE.

M-RoPE gives every token three position ids (temporal, height, width). Text tokens carry the same id in all
three; the tokens of an image carry (t0, t0 + row, t0 + col) on a grid of merged patches. The rotary frequencies
of a head are split into ``mrope_section`` chunks (t, h, w) and each chunk is rotated by its own id.
"""

from __future__ import annotations

import torch

from .config import ModelConfig


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """[..., D] → [..., D]: (x1, x2) ↦ (−x2, x1) over the two halves of the last dim."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [T, heads, D] by cos/sin [T, D] (broadcast over heads), in x's dtype."""
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
    return x * cos + rotate_half(x) * sin


def inv_freq(dim: int, theta: float, device: torch.device | None = None) -> torch.Tensor:
    """Inverse frequencies 1/theta^(2i/dim) for i < dim/2, fp32 [dim/2]."""
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32, device=device) / dim))


def mrope_cos_sin(
    position_ids: torch.Tensor, freqs: torch.Tensor, mrope_section: list[int], dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """M-RoPE tables: position_ids int [3, T], freqs fp32 [D/2] → cos, sin [T, D] in ``dtype``.

    Frequency chunk j of ``mrope_section`` takes the angle of axis j % 3; the half is then duplicated, as in
    rotate-half RoPE.
    """
    angles = position_ids.to(torch.float32).unsqueeze(-1) * freqs  # [3, T, D/2]
    chunks = angles.split(mrope_section, dim=-1)
    angles = torch.cat([c[i % 3] for i, c in enumerate(chunks)], dim=-1)  # [T, D/2]
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def vision_patch_positions(grid_thw: torch.Tensor, merge: int) -> torch.Tensor:
    """(row, col) of every patch, int64 [P, 2], in the processor's patch order.

    The processor emits patches merge-window by merge-window (each run of merge² patches is one LLM token), so the
    grid's rows/cols are permuted the same way here.
    """
    out = []
    for t, h, w in grid_thw.tolist():
        rows = torch.arange(h).unsqueeze(1).expand(h, w)
        cols = torch.arange(w).unsqueeze(0).expand(h, w)
        pos = torch.stack([rows, cols], dim=-1)  # [h, w, 2]
        pos = pos.reshape(h // merge, merge, w // merge, merge, 2).permute(0, 2, 1, 3, 4).reshape(-1, 2)
        out.append(pos.repeat(t, 1))
    return torch.cat(out)


def vision_cos_sin(
    grid_thw: torch.Tensor, head_dim: int, theta: float, merge: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """2-D RoPE tables for the vision tower: fp32 cos, sin [P, head_dim].

    The first quarter of frequencies rotates by the row, the second by the column; the half is duplicated.
    """
    pos = vision_patch_positions(grid_thw, merge).to(device)
    freqs = inv_freq(head_dim // 2, theta, device)  # [head_dim/4]
    angles = (pos.to(torch.float32).unsqueeze(-1) * freqs).flatten(1)  # [P, head_dim/2]: rows then cols
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos(), angles.sin()


def mrope_position_ids(
    input_ids: torch.Tensor, image_grid_thw: torch.Tensor | None, config: ModelConfig, start: int = 0
) -> torch.Tensor:
    """M-RoPE position ids int64 [3, T] for ONE sequence (as HF ``get_rope_index``; images only).

    Every run of image tokens must be exactly one image of ``image_grid_thw`` (in order): t·h·w / merge² tokens.
    Text after an image continues from the image's largest id + 1. ``start`` offsets all ids (for appending a chunk
    to a sequence whose next free id is ``start``).
    """
    if input_ids.dim() != 1:
        raise ValueError(f"mrope_position_ids: input_ids must be 1-D, got shape {tuple(input_ids.shape)}")
    merge = config.vision.spatial_merge_size
    ids = input_ids.tolist()
    is_image = [i == config.image_token_id for i in ids]
    grids = [] if image_grid_thw is None else image_grid_thw.tolist()
    pieces: list[torch.Tensor] = []
    pos, i, image_index, n = start, 0, 0, len(ids)
    while i < n:
        j = i
        while j < n and is_image[j] == is_image[i]:
            j += 1
        if not is_image[i]:
            pieces.append(torch.arange(pos, pos + j - i).unsqueeze(0).expand(3, -1))
            pos += j - i
            i = j
            continue
        # consecutive image runs (two images back to back) are split by their grid sizes
        while i < j:
            if image_index >= len(grids):
                raise ValueError(f"mrope_position_ids: more image-token runs than image_grid_thw rows ({len(grids)})")
            t, h, w = grids[image_index]
            h, w = h // merge, w // merge
            if i + t * h * w > j:
                raise ValueError(
                    f"mrope_position_ids: image {image_index} needs {t * h * w} image tokens, run has {j - i}"
                )
            tt = torch.arange(t).view(-1, 1, 1).expand(t, h, w).flatten()
            hh = torch.arange(h).view(1, -1, 1).expand(t, h, w).flatten()
            ww = torch.arange(w).view(1, 1, -1).expand(t, h, w).flatten()
            pieces.append(torch.stack([tt, hh, ww]) + pos)
            pos += max(h, w)
            i += t * h * w
            image_index += 1
    if image_index != len(grids):
        raise ValueError(f"mrope_position_ids: {len(grids)} images in image_grid_thw, {image_index} in input_ids")
    if not pieces:
        return torch.zeros(3, 0, dtype=torch.long)
    return torch.cat(pieces, dim=1).to(device=input_ids.device, dtype=torch.long)
