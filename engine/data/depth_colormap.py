"""Spectral_r depth colouring, as the SIFThinker release makes and reads its depth images.

Convention everywhere in the engine: depth is float in [0, 1], 0 = nearest, 1 = farthest.

Making (Depth Anything V2's ``run.py``, which SIF-50K used): the map is min–max normalised, scaled by 255 and
truncated to uint8, and palette entry ``k`` of matplotlib's 256-entry Spectral_r is drawn. The model's output is
disparity (large = near), so in our depth convention ``k = trunc((1 − d_norm) · 255)``: near is red, far is blue.

Reading (the release's ``load_depth_from_color``): the nearest palette colour index ``k`` gives depth
``1 − k/255``. The release queries a KD-tree per pixel; here exact palette colours (every pixel of a PNG the
release wrote) are found by a binary search over the 256 sorted 24-bit colour codes, and only the distinct colours
that are not in the palette (lossy re-encoding, resizing) get a brute-force nearest-colour search. Ties between
equidistant palette colours go to the lower index.
"""

from __future__ import annotations

import functools

import numpy as np
import torch

PALETTE_SIZE = 256


@functools.cache
def spectral_r_palette() -> np.ndarray:
    """uint8 [256, 3] RGB palette: matplotlib Spectral_r at k/255, scaled by 255 and truncated (as the release)."""
    import matplotlib

    rgba = matplotlib.colormaps["Spectral_r"](np.arange(PALETTE_SIZE) / (PALETTE_SIZE - 1.0))
    palette = (rgba[:, :3] * 255.0).astype(np.uint8)
    palette.setflags(write=False)
    return palette


def _codes(rgb: np.ndarray) -> np.ndarray:
    rgb = rgb.astype(np.int32, copy=False)
    return (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]


@functools.cache
def _sorted_palette_codes() -> tuple[np.ndarray, np.ndarray]:
    codes = _codes(spectral_r_palette())
    order = np.argsort(codes, kind="stable")
    return codes[order], order


def _to_numpy(x: np.ndarray | torch.Tensor) -> tuple[np.ndarray, bool]:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy(), True
    return np.asarray(x), False


def depth_to_spectral_r(depth: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
    """Colour-map a depth map [H, W] (any real dtype; 0 = near) to uint8 RGB [H, W, 3], min–max normalised first.

    Returns the same kind (numpy or torch) as the input. A constant map becomes palette entry 255 (nearest).
    """
    d, is_torch = _to_numpy(depth)
    if d.ndim != 2:
        raise ValueError(f"depth must be [H, W], got shape {d.shape}")
    d = d.astype(np.float64)
    if not np.isfinite(d).all():
        raise ValueError("depth contains non-finite values")
    lo, hi = (float(d.min()), float(d.max())) if d.size else (0.0, 0.0)
    norm = (d - lo) / (hi - lo) if hi > lo else np.zeros_like(d)
    index = ((1.0 - norm) * 255.0).astype(np.uint8)
    rgb = spectral_r_palette()[index]
    return torch.from_numpy(rgb) if is_torch else rgb


def spectral_r_index(rgb: np.ndarray) -> np.ndarray:
    """Nearest Spectral_r palette index (uint8 [...]) of every colour in uint8 RGB [..., 3]."""
    if rgb.shape[-1:] != (3,):
        raise ValueError(f"expected RGB [..., 3], got shape {rgb.shape}")
    codes = _codes(rgb)
    sorted_codes, order = _sorted_palette_codes()
    pos = np.minimum(np.searchsorted(sorted_codes, codes), PALETTE_SIZE - 1)
    hit = sorted_codes[pos] == codes
    index = order[pos].astype(np.uint8)
    if not hit.all():
        missing, inverse = np.unique(codes[~hit], return_inverse=True)
        colours = np.stack([(missing >> 16) & 255, (missing >> 8) & 255, missing & 255], axis=-1)
        palette = spectral_r_palette().astype(np.int32)
        nearest = np.empty(len(missing), dtype=np.uint8)
        for start in range(0, len(missing), 4096):  # bounded memory: 4096 x 256 distances per chunk
            chunk = colours[start : start + 4096]
            dist = ((chunk[:, None, :] - palette[None, :, :]) ** 2).sum(-1)
            nearest[start : start + 4096] = dist.argmin(axis=1)
        index[~hit] = nearest[inverse.reshape(-1)]
    return index


def spectral_r_to_depth(rgb: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
    """Invert a Spectral_r depth image uint8 [H, W, 3] to float32 depth [H, W] = 1 − k/255 (0 = near).

    Returns the same kind (numpy or torch) as the input.
    """
    arr, is_torch = _to_numpy(rgb)
    if arr.dtype != np.uint8:
        raise ValueError(f"expected a uint8 RGB image, got dtype {arr.dtype}")
    depth = 1.0 - spectral_r_index(arr).astype(np.float32) / np.float32(255.0)
    return torch.from_numpy(depth) if is_torch else depth
