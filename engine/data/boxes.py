"""Normalised box geometry shared by the trace builder, the generator and the rewards.

Boxes are ``(x1, y1, x2, y2)`` floats normalised to [0, 1] (x to the right, y down), x2 > x1, y2 > y1.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

Box = tuple[float, float, float, float]


def box_problem(box: Sequence[float]) -> str | None:
    """Why ``box`` is not a valid normalised box, or None."""
    if len(box) != 4:
        return f"expected 4 numbers, got {len(box)}"
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in box):
        return f"non-numeric or non-finite coordinate in {list(box)}"
    if not all(0.0 <= v <= 1.0 for v in box):
        return f"{list(box)} lies outside the image (coordinates must be in [0, 1])"
    if not (box[2] > box[0] and box[3] > box[1]):
        return f"{list(box)} is empty (need x2 > x1 and y2 > y1)"
    return None


def iou(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection over union of two boxes."""
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def enclosing_box(boxes: Sequence[Sequence[float]]) -> Box:
    """The smallest box containing all ``boxes``."""
    return (
        min(b[0] for b in boxes),
        min(b[1] for b in boxes),
        max(b[2] for b in boxes),
        max(b[3] for b in boxes),
    )


def contains(outer: Sequence[float], inner: Sequence[float], tol: float = 1e-9) -> bool:
    """True when ``inner`` lies inside ``outer``."""
    return (
        outer[0] <= inner[0] + tol
        and outer[1] <= inner[1] + tol
        and outer[2] >= inner[2] - tol
        and outer[3] >= inner[3] - tol
    )


def round_outward(box: Sequence[float], decimals: int = 3) -> Box:
    """Round to ``decimals`` so that the result contains ``box`` (x1, y1 down; x2, y2 up), clipped to [0, 1]."""
    scale = 10.0**decimals
    eps = 1e-9  # absorb binary error so that values already on the grid stay put
    x1 = math.floor(box[0] * scale + eps) / scale
    y1 = math.floor(box[1] * scale + eps) / scale
    x2 = math.ceil(box[2] * scale - eps) / scale
    y2 = math.ceil(box[3] * scale - eps) / scale
    return (max(0.0, x1), max(0.0, y1), min(1.0, x2), min(1.0, y2))


def box_pixel_bounds(box: Sequence[float], height: int, width: int) -> tuple[int, int, int, int]:
    """Pixel rows ``r0 .. r1 - 1`` and columns ``c0 .. c1 - 1`` a normalised box touches: the one definition of a
    box's pixels for its depth, shared by the trace writer (:func:`box_mean_depth`), both depth-reward profiles and
    the depth statistics of ``engine.ops.crop_boxes`` (which the reward calls with these integer bounds).

    ``c0 = clamp(floor(x1·W), 0, W − 1)``, ``c1 = clamp(ceil(x2·W), c0 + 1, W)``, rows alike: every pixel the box
    overlaps, even partly. This is the rounding of the released SIFThinker's ``calculate_avg_depth``, in float64 as
    there (so ``ceil(0.07·100) = 8``, 0.07·100 being 7.000000000000001); the release raises where ``c1 <= c0``
    after clamping, here at least one pixel is kept, which only matters for boxes that are not valid."""
    c0 = min(max(int(math.floor(box[0] * width)), 0), width - 1)
    r0 = min(max(int(math.floor(box[1] * height)), 0), height - 1)
    c1 = min(max(int(math.ceil(box[2] * width)), c0 + 1), width)
    r1 = min(max(int(math.ceil(box[3] * height)), r0 + 1), height)
    return r0, r1, c0, c1


def box_mean_depth(depth: np.ndarray | torch.Tensor, box: Sequence[float]) -> float:
    """Mean of a depth map [H, W] over the pixels a normalised box touches (:func:`box_pixel_bounds`)."""
    h, w = depth.shape[-2:]
    r0, r1, c0, c1 = box_pixel_bounds(box, h, w)
    return float(depth[..., r0:r1, c0:c1].mean())
