"""Box-set overlap for the grounding reward: exact union-region IoU and Hungarian-matched IoU.

Boxes are axis-aligned ``[x1, y1, x2, y2]`` rows (any consistent unit; the rewards use normalised [0, 1]
coordinates). Both measures compare a *set* of predicted boxes with a *set* of ground-truth boxes:

* ``union_iou``: IoU of the two regions covered by the sets, ``|∪P ∩ ∪G| / |∪P ∪ ∪G|``, computed **exactly**
  (no rasterisation, no polygon library) by coordinate compression: the distinct x and y edges of all boxes cut
  the plane into a grid of cells, each cell lies wholly inside or wholly outside every box, so summing the areas
  of the cells covered by ``P`` and/or ``G`` is exact. Cost O((|P|+|G|)^3), tiny for the handful of boxes an area
  holds.
* ``matched_iou``: one-to-one matching of predicted to ground-truth boxes maximising the summed pairwise IoU
  (``scipy.optimize.linear_sum_assignment``); unmatched boxes count as 0, the sum is divided by
  ``max(|P|, |G|)``, so extra or missing boxes are penalised.

Degenerate boxes (zero width or height) have zero area; an empty set gives IoU 0.

``release_box_set_iou`` is the released SIFThinker's variant (the ``release`` reward profile, docs/rewards.md):
boxes are used as written (never re-ordered), a box without positive width and height is left out of the union
region but still takes part in the matching (with IoU 0), the matched sum is divided by ``min(|P|, |G|)`` (the
mean over matched pairs: extra or missing boxes are not penalised there), and two empty sets score 1.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy.optimize import linear_sum_assignment

BoxesLike = Sequence[Sequence[float]] | np.ndarray


def _as_boxes(boxes: BoxesLike, name: str, reorder: bool = True) -> np.ndarray:
    """float64 [K, 4]; with ``reorder`` x1 <= x2, y1 <= y2 (coordinates are re-ordered, never rejected)."""
    arr = np.asarray(boxes, dtype=np.float64)
    if arr.size == 0:
        return np.zeros((0, 4))
    if arr.ndim != 2 or arr.shape[1] != 4:
        raise ValueError(f"{name}: expected boxes of shape [K, 4], got {arr.shape}")
    if not np.isfinite(arr).all():
        raise ValueError(f"{name}: boxes contain NaN or inf: {arr.tolist()}")
    if not reorder:
        return arr
    x1, x2 = np.minimum(arr[:, 0], arr[:, 2]), np.maximum(arr[:, 0], arr[:, 2])
    y1, y2 = np.minimum(arr[:, 1], arr[:, 3]), np.maximum(arr[:, 1], arr[:, 3])
    return np.stack([x1, y1, x2, y2], axis=1)


def _covered(boxes: np.ndarray, cx: np.ndarray, cy: np.ndarray) -> np.ndarray:
    """Bool [nx, ny]: grid cell (centre cx[i], cy[j]) lies inside at least one box."""
    if len(boxes) == 0:
        return np.zeros((len(cx), len(cy)), dtype=bool)
    in_x = (boxes[:, 0, None] <= cx[None, :]) & (cx[None, :] <= boxes[:, 2, None])  # [K, nx]
    in_y = (boxes[:, 1, None] <= cy[None, :]) & (cy[None, :] <= boxes[:, 3, None])  # [K, ny]
    return (in_x[:, :, None] & in_y[:, None, :]).any(axis=0)


def union_areas(pred: BoxesLike, gt: BoxesLike) -> tuple[float, float, float]:
    """Exact (|∪P|, |∪G|, |∪P ∩ ∪G|) by coordinate compression."""
    p, g = _as_boxes(pred, "pred"), _as_boxes(gt, "gt")
    both = np.concatenate([p, g], axis=0)
    if len(both) == 0:
        return 0.0, 0.0, 0.0
    xs = np.unique(np.concatenate([both[:, 0], both[:, 2]]))
    ys = np.unique(np.concatenate([both[:, 1], both[:, 3]]))
    if len(xs) < 2 or len(ys) < 2:
        return 0.0, 0.0, 0.0
    cx, cy = (xs[:-1] + xs[1:]) / 2, (ys[:-1] + ys[1:]) / 2
    cell = np.diff(xs)[:, None] * np.diff(ys)[None, :]
    in_p, in_g = _covered(p, cx, cy), _covered(g, cx, cy)
    return float((cell * in_p).sum()), float((cell * in_g).sum()), float((cell * (in_p & in_g)).sum())


def union_iou(pred: BoxesLike, gt: BoxesLike) -> float:
    """IoU of the region covered by ``pred`` with the region covered by ``gt`` (exact); 0 when both are empty."""
    area_p, area_g, inter = union_areas(pred, gt)
    union = area_p + area_g - inter
    return inter / union if union > 0 else 0.0


def pairwise_iou(pred: BoxesLike, gt: BoxesLike, reorder: bool = True) -> np.ndarray:
    """float64 [|P|, |G|] IoU of every predicted box with every ground-truth box.

    ``reorder=False`` takes the corners as written: a box with x2 <= x1 or y2 <= y1 then overlaps nothing (IoU 0).
    """
    p, g = _as_boxes(pred, "pred", reorder), _as_boxes(gt, "gt", reorder)
    ix = np.clip(np.minimum(p[:, None, 2], g[None, :, 2]) - np.maximum(p[:, None, 0], g[None, :, 0]), 0, None)
    iy = np.clip(np.minimum(p[:, None, 3], g[None, :, 3]) - np.maximum(p[:, None, 1], g[None, :, 1]), 0, None)
    inter = ix * iy
    area_p = (p[:, 2] - p[:, 0]) * (p[:, 3] - p[:, 1])
    area_g = (g[:, 2] - g[:, 0]) * (g[:, 3] - g[:, 1])
    union = area_p[:, None] + area_g[None, :] - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def matched_iou(pred: BoxesLike, gt: BoxesLike) -> float:
    """Hungarian-matched IoU: max over one-to-one matchings of sum(IoU) / max(|P|, |G|); 0 if either set is empty."""
    ious = pairwise_iou(pred, gt)
    if ious.size == 0:
        return 0.0
    rows, cols = linear_sum_assignment(ious, maximize=True)
    return float(ious[rows, cols].sum()) / max(ious.shape)


def box_set_iou(pred: BoxesLike, gt: BoxesLike) -> float:
    """The grounding IoU of design.md §6: mean of ``union_iou`` and ``matched_iou``."""
    return 0.5 * (union_iou(pred, gt) + matched_iou(pred, gt))


def release_box_set_iou(pred: BoxesLike, gt: BoxesLike) -> float:
    """The released SIFThinker's box-set IoU: ``(union term + matched term) / 2`` with boxes as written.

    union term: IoU of the regions covered by the boxes with positive width and height (others are left out);
    1 when neither set has such a box, 0 when only one has. matched term: Hungarian-matched sum of pairwise IoU
    (corners as written, so an inverted or flat box scores 0 with everything) over ``min(|P|, |G|)``; 1 when both
    sets are empty, 0 when one is. Coordinates must be finite (the caller decides what an unreadable box means).
    """
    p, g = _as_boxes(pred, "pred", reorder=False), _as_boxes(gt, "gt", reorder=False)
    positive = lambda b: b[(b[:, 2] > b[:, 0]) & (b[:, 3] > b[:, 1])]
    pp, gp = positive(p), positive(g)
    if len(pp) == 0 or len(gp) == 0:
        union_term = 1.0 if len(pp) == len(gp) else 0.0
    else:
        union_term = union_iou(pp, gp)
    if len(p) == 0 or len(g) == 0:
        matched_term = 1.0 if len(p) == len(g) else 0.0
    else:
        ious = pairwise_iou(p, g, reorder=False)
        rows, cols = linear_sum_assignment(ious, maximize=True)
        matched_term = float(ious[rows, cols].sum()) / min(ious.shape)
    return 0.5 * (union_term + matched_term)
