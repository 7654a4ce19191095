"""The crop-mode focus hook: after each ``</area>``, crop the named boxes and hand them back as new views.

``engine.models.generate`` calls the hook with every sample whose newest token completed ``</area>`` (one call per
decode step, batched over the whole rollout batch). The hook parses the boxes of that last area
(``sif_format.last_area_boxes``), crops RGB (and depth, when depth views are on) for *all* requesting samples in
ONE ``engine.ops.crop_boxes`` call, and returns, per request, the list of images to splice in:
for each box its RGB crop (float32 [3, h, w] in [0, 1]) followed, with depth views, by its depth crop coloured
like the prompt's depth image (Spectral_r, uint8 [h, w, 3]). An area with no valid box (unreadable, or every box
degenerate: x2 <= x1, out of [0, 1]) gets one view of the whole image instead: every ``</area>`` a crop-mode SFT
trace shows is followed by views, so a policy handed none there would sample a token it was never trained to
predict; the format reward still punishes the area. Each sample may receive at most ``max_views`` views over its
whole rollout; views beyond the budget are dropped in order (``None`` once it is spent, as SFT traces show past
their budget).

The prompt images are kept at their decoded resolution (not the processor's resized one) so crops carry detail
the model could not see; prompts of different sizes are zero-padded bottom/right into one stacked batch once per
rollout batch (box pixel coordinates of each image stay valid in its padded frame).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Protocol

import torch

from engine.data.depth_colormap import spectral_r_palette
from engine.data.sif_format import DepthBox, last_area_boxes
from engine.ops import crop_boxes

WHOLE_IMAGE = DepthBox(0.0, 0.0, 1.0, 1.0, 0.0)
"""The view an area with no valid box gets (its depth is not used)."""


class FocusRequestLike(Protocol):
    """What the hook reads from ``engine.models.FocusRequest``."""

    prompt_index: int
    sample_index: int
    completion_text: str


def _stack_padded(tensors: Sequence[torch.Tensor], fill: float | int = 0) -> torch.Tensor:
    """Stack [H_i, W_i, ...] tensors into [N, max H, max W, ...], padding bottom/right with ``fill``."""
    h = max(t.shape[0] for t in tensors)
    w = max(t.shape[1] for t in tensors)
    if all(t.shape[:2] == (h, w) for t in tensors):
        return torch.stack(list(tensors))
    out = torch.full((len(tensors), h, w, *tensors[0].shape[2:]), fill, dtype=tensors[0].dtype)
    for i, t in enumerate(tensors):
        out[i, : t.shape[0], : t.shape[1]] = t
    return out


class CropFocusHook:
    """Callable ``focus_hook`` for one rollout batch.

    images: per prompt, the RGB image uint8 [H, W, 3] at decoded resolution.
    depths: per prompt, scalar depth float32 [H, W] in [0, 1] (same size as its image) or None; depth views are
        produced only when every prompt has one and ``depth_views`` is set.
    crop_size: (h, w) of every view, best a multiple of the vision patch x merge size (28 for Qwen2.5-VL).
    max_views: box views per sample over its whole rollout.
    """

    def __init__(
        self,
        images: Sequence[torch.Tensor],
        depths: Sequence[torch.Tensor | None],
        *,
        crop_size: tuple[int, int] = (112, 112),
        max_views: int = 4,
        depth_views: bool = True,
    ) -> None:
        if len(images) != len(depths):
            raise ValueError(f"CropFocusHook: {len(images)} images but {len(depths)} depth maps")
        for i, (img, dep) in enumerate(zip(images, depths)):
            if img.dtype != torch.uint8 or img.dim() != 3 or img.shape[2] != 3:
                got = f"{img.dtype} {tuple(img.shape)}"
                raise ValueError(f"CropFocusHook: image {i} must be uint8 [H, W, 3], got {got}")
            if dep is not None and tuple(dep.shape) != tuple(img.shape[:2]):
                raise ValueError(
                    f"CropFocusHook: depth {i} has shape {tuple(dep.shape)}, its image is {tuple(img.shape[:2])}"
                )
        self.sizes = [(int(img.shape[0]), int(img.shape[1])) for img in images]
        self.images = _stack_padded(images)  # uint8 [P, H, W, 3]
        self.with_depth = depth_views and all(d is not None for d in depths)
        self.depths = _stack_padded([d.float() for d in depths]) if self.with_depth else None  # [P, H, W]
        self.palette = torch.from_numpy(spectral_r_palette().copy())  # uint8 [256, 3]
        self.crop_size = crop_size
        self.max_views = max_views
        self.views_used: dict[tuple[int, int], int] = {}
        self.num_calls = 0
        self.num_views = 0
        self.seconds = 0.0

    def _colour(self, depth: torch.Tensor) -> torch.Tensor:
        """Depth crop [h, w] in [0, 1] -> uint8 [h, w, 3] with the prompt depth image's Spectral_r mapping.

        Not re-normalised per crop (``depth_to_spectral_r`` would stretch the crop's range): the depth map is
        already normalised over the whole image, so a crop keeps the colours the model saw in the prompt.
        """
        index = ((1.0 - depth.clamp(0.0, 1.0)) * 255.0).round().long()  # entry k <-> depth 1 − k/255
        return self.palette[index]

    def __call__(self, requests: Sequence[FocusRequestLike]) -> list[list[torch.Tensor] | None]:
        start = time.perf_counter()
        self.num_calls += 1
        boxes: list[list[float]] = []
        index: list[int] = []
        owner: list[int] = []
        for r, req in enumerate(requests):
            key = (req.prompt_index, req.sample_index)
            budget = self.max_views - self.views_used.get(key, 0)
            if budget <= 0 or not req.completion_text.rstrip().endswith("</area>"):
                continue
            area = last_area_boxes(req.completion_text) or [WHOLE_IMAGE]
            h, w = self.sizes[req.prompt_index]
            for box in area[:budget]:
                boxes.append([box.x1 * w, box.y1 * h, box.x2 * w, box.y2 * h])
                index.append(req.prompt_index)
                owner.append(r)
            self.views_used[key] = self.views_used.get(key, 0) + min(len(area), budget)
        views: list[list[torch.Tensor] | None] = [None] * len(requests)
        if boxes:
            result = crop_boxes(
                self.images,
                torch.tensor(boxes, dtype=torch.float32),
                torch.tensor(index, dtype=torch.int64),
                self.crop_size,
                depth=self.depths,
            )
            for k, r in enumerate(owner):
                got = views[r] if views[r] is not None else []
                got.append(result.crops[k])
                if self.with_depth:
                    got.append(self._colour(result.depth_crops[k, 0]))
                views[r] = got
            self.num_views += len(boxes)
        self.seconds += time.perf_counter() - start
        return views
