"""Python face of the native ops in ``engine._C`` (csrc/): batched box cropping with depth fusion.

``crop_boxes`` crops many boxes from many images in one call of the native op ``torch.ops.sif.crop_boxes``
(C++/OpenMP on CPU, one CUDA launch for the crops on GPU), resizes each box to ``out_size``, scales uint8 to
[0, 1], normalises with mean/std and, when a depth map is given, resamples the depth the same way and computes
per-box depth statistics. It is what the rollout's focus hook calls every time boxes close.

Sampling definition (identical in the CPU and CUDA kernels, csrc/crop_boxes_geometry.h, and in
``crop_boxes_reference``). Coordinates are continuous pixel coordinates: pixel ``i`` covers ``[i, i + 1)``. Per
axis (x shown, y alike), for a box ``[x1, x2)``:

* clamp to the image: ``c1 = clamp(x1, 0, W)``, ``c2 = clamp(x2, 0, W)``; ``c2 <= c1`` is an error;
* the box's support pixels are those whose centres ``i + 0.5`` lie in ``[c1, c2)``, i.e. ``lo = ceil(c1 - 0.5)``
  to ``hi = ceil(c2 - 0.5) - 1``; a sub-pixel box containing no centre uses the one pixel containing its centre,
  ``lo = hi = min(floor((c1 + c2) / 2), W - 1)``;
* output sample ``j`` (``0 <= j < out_w``) reads, in pixel-index coordinates (centre of pixel ``i`` at ``i``),
  ``src_x = c1 + (j + 0.5) * (c2 - c1) / out_w - 0.5``, computed in float32 as
  ``lo + (fma(step, j + 0.5, -0.5) + (c1 - lo))`` with ``step = (c2 - c1) / out_w`` (ATen's rounding: its
  bilinear kernels compute ``fma(scale, j + 0.5, -0.5)`` on CUDA and in their AVX2/AVX512 CPU builds);
* bilinear with edge clamping to the support: ``s = clamp(src_x, lo, hi)``, taps ``floor(s)`` and
  ``min(floor(s) + 1, hi)``, the second weighted ``s - floor(s)``.

For integer boxes the support is the sliced region ``[y1:y2, x1:x2]``, so a crop equals slicing that region and
calling ``F.interpolate(mode="bilinear", align_corners=False)``. For fractional boxes the sample positions follow
the continuous box while the taps stay inside the support, so no pixel whose centre lies outside the box ever
contributes (as with slicing). Colours: uint8 is divided by 255, then ``(x - mean) / std``; float images are
used as they are (expected in [0, 1]). Depth crops use the same sampling.

Depth statistics ``(median, mean, min)`` are taken over the pixels the box *touches*, not over the sampling
support: columns ``floor(c1) .. ceil(c2) - 1`` of the clamped box (``lo = min(floor(c1), W - 1)``, at least one
pixel), rows alike. That is the project's one definition of a box's depth (``engine.data.boxes.box_pixel_bounds``),
shared with the SIF trace writer and the depth reward, and the released SIFThinker's ``calculate_avg_depth``. For
integer boxes the two pixel sets coincide; a fractional box such as ``x ∈ [0.8, 2.0)`` samples pixel 1 only but
its statistics read pixels 0 and 1. Callers holding normalised boxes should pass the integer bounds of
``box_pixel_bounds`` (computed in float64), as the depth reward does, so that the float32 ``floor``/``ceil`` here
never decides a pixel for them. The median is the lower median (``torch.median``'s convention, rank
``(n - 1) // 2``). Depth must be finite (non-finite values give unspecified statistics).

CUDA kernels: the environment variable ``SIF_CROP_BOXES_KERNEL``, read at each call, selects ``v1`` (default, the
measured one) or ``v2`` (tiled crops with the depth statistics fused in, same outputs; opt-in until a GPU run of
``tests/test_crop_boxes_cuda_v2.py`` validates it).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F

BUILD_HINT = (
    "the native extension engine._C (torch.ops.sif.crop_boxes) is not built: run "
    "`pip install --no-build-isolation -e .` in the repository root (it compiles csrc/ in place; on a GPU machine "
    "with nvcc and a CUDA build of torch it also compiles the CUDA kernel, see README)"
)

try:
    from engine import _C  # noqa: F401  (loading the library registers torch.ops.sif.*)
except ImportError as _exc:
    _IMPORT_ERROR: ImportError | None = _exc
else:
    _IMPORT_ERROR = None

    @torch.library.register_fake("sif::crop_boxes")
    def _crop_boxes_fake(
        images: torch.Tensor,
        boxes: torch.Tensor,
        box_image_index: torch.Tensor,
        out_size: Sequence[int],
        depth: torch.Tensor | None = None,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Output shapes of sif::crop_boxes: ([K,3,h,w], [K,1,h,w] or [0], [K,3] or [0]), float32."""
        torch._check(boxes.dim() == 2 and boxes.shape[1] == 4, lambda: "crop_boxes: boxes must be [K, 4]")
        k = boxes.shape[0]
        h, w = out_size
        crops = images.new_empty((k, 3, h, w), dtype=torch.float32)
        if depth is None:
            empty = images.new_empty((0,), dtype=torch.float32)
            return crops, empty, empty.clone()
        return crops, images.new_empty((k, 1, h, w), dtype=torch.float32), images.new_empty((k, 3), dtype=torch.float32)


class CropResult(NamedTuple):
    """Outputs of ``crop_boxes``; the depth fields are None when no depth map was given."""

    crops: torch.Tensor  # float32 [K, 3, h, w], normalised
    depth_crops: torch.Tensor | None  # float32 [K, 1, h, w]
    depth_stats: torch.Tensor | None  # float32 [K, 3]: lower median, mean, min over the pixels the box touches


def crop_boxes(
    images: torch.Tensor,
    boxes: torch.Tensor,
    box_image_index: torch.Tensor,
    out_size: int | Sequence[int],
    *,
    depth: torch.Tensor | None = None,
    mean: Sequence[float] | torch.Tensor | None = None,
    std: Sequence[float] | torch.Tensor | None = None,
) -> CropResult:
    """Crop, resize, normalise every box of a batch in one native call (see the module docstring for the
    exact sampling definition).

    Args:
        images: uint8 ``[N, H, W, 3]`` (as decoded) or float32 ``[N, 3, H, W]`` (in [0, 1]).
        boxes: ``[K, 4]`` pixel ``x1, y1, x2, y2`` (any real dtype; used as float32).
        box_image_index: integer ``[K]``, the image of each box.
        out_size: ``(h, w)`` of every crop, or one int for square crops.
        depth: float32 ``[N, H, W]`` or None.
        mean, std: 3 per-channel values applied after scaling uint8 to [0, 1], or None (0 and 1).

    Returns:
        ``CropResult(crops [K,3,h,w], depth_crops [K,1,h,w] | None, depth_stats [K,3] | None)``, float32 on the
        device of ``images``.

    Raises:
        ValueError: bad shapes/dtypes/devices/mean/std, or a box that is non-finite or has no area once clamped.
        IndexError: a ``box_image_index`` outside ``[0, N)``.
        RuntimeError: the extension is not built (the message says how to build it).

    The per-box checks need the box values on the host: for CUDA boxes that is one small device-to-host copy.
    Under ``torch.compile`` they are left to the native op (which checks CPU boxes; CUDA kernels write NaN for an
    out-of-range image index and are memory-safe for any box).
    """
    if _IMPORT_ERROR is not None:
        raise RuntimeError(BUILD_HINT) from _IMPORT_ERROR
    size = _out_size(out_size)
    _check_tensors(images, boxes, box_image_index, depth)
    boxes = boxes.to(torch.float32)
    box_image_index = box_image_index.to(torch.int64)
    mean_list = _channel_values(mean, "mean")
    std_list = _channel_values(std, "std")
    if std_list is not None and min(std_list) <= 0:
        raise ValueError(f"crop_boxes: std must be > 0 per channel, got {std_list}")
    if not torch.compiler.is_compiling():
        _check_boxes(boxes, box_image_index, images)
    crops, depth_crops, depth_stats = torch.ops.sif.crop_boxes(
        images, boxes, box_image_index, size, depth, mean_list, std_list
    )
    if depth is None:
        return CropResult(crops, None, None)
    return CropResult(crops, depth_crops, depth_stats)


def _out_size(out_size: int | Sequence[int]) -> list[int]:
    if isinstance(out_size, int):
        out_size = (out_size, out_size)
    size = [int(s) for s in out_size]
    if len(size) != 2 or min(size) <= 0 or any(s != v for s, v in zip(size, out_size)):
        raise ValueError(f"crop_boxes: out_size must be (h, w) with positive integers, got {out_size!r}")
    return size


def _image_hw(images: torch.Tensor) -> tuple[int, int]:
    if images.dtype == torch.uint8:
        if images.dim() != 4 or images.shape[3] != 3:
            raise ValueError(f"crop_boxes: uint8 images must be [N, H, W, 3], got {tuple(images.shape)}")
        return images.shape[1], images.shape[2]
    if images.dtype == torch.float32:
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"crop_boxes: float32 images must be [N, 3, H, W], got {tuple(images.shape)}")
        return images.shape[2], images.shape[3]
    raise ValueError(f"crop_boxes: images must be uint8 [N, H, W, 3] or float32 [N, 3, H, W], got {images.dtype}")


def _check_tensors(
    images: torch.Tensor, boxes: torch.Tensor, box_image_index: torch.Tensor, depth: torch.Tensor | None
) -> None:
    h, w = _image_hw(images)
    if boxes.dim() != 2 or boxes.shape[1] != 4:
        raise ValueError(f"crop_boxes: boxes must be [K, 4], got {tuple(boxes.shape)}")
    if boxes.dtype.is_complex or boxes.dtype == torch.bool:
        raise ValueError(f"crop_boxes: boxes must be real numbers, got {boxes.dtype}")
    k = boxes.shape[0]
    if box_image_index.shape != (k,) or box_image_index.dtype.is_floating_point or box_image_index.dtype.is_complex:
        raise ValueError(
            f"crop_boxes: box_image_index must be an integer tensor [K={k}], got "
            f"{box_image_index.dtype} {tuple(box_image_index.shape)}"
        )
    for name, t in (("boxes", boxes), ("box_image_index", box_image_index), ("depth", depth)):
        if t is not None and t.device != images.device:
            raise ValueError(f"crop_boxes: {name} is on {t.device} but images are on {images.device}")
    if depth is not None:
        if depth.dtype != torch.float32:
            raise ValueError(f"crop_boxes: depth must be float32, got {depth.dtype}")
        if depth.shape != (images.shape[0], h, w):
            raise ValueError(
                f"crop_boxes: depth must be [N, H, W] = {[images.shape[0], h, w]} to match images, got "
                f"{tuple(depth.shape)}"
            )


def _channel_values(values: Sequence[float] | torch.Tensor | None, name: str) -> list[float] | None:
    if values is None:
        return None
    out = [float(v) for v in (values.tolist() if isinstance(values, torch.Tensor) else values)]
    if len(out) != 3 or not all(math.isfinite(v) for v in out):
        raise ValueError(f"crop_boxes: {name} must be 3 finite values (one per channel), got {values!r}")
    return out


def _check_boxes(boxes: torch.Tensor, box_image_index: torch.Tensor, images: torch.Tensor) -> None:
    """Raise naming the first bad box: index out of range, non-finite, or no area after clamping."""
    if boxes.shape[0] == 0:
        return
    n = images.shape[0]
    h, w = _image_hw(images)
    b = boxes.detach().cpu()
    idx = box_image_index.detach().cpu()
    x1, y1, x2, y2 = b.unbind(1)
    bad_index = (idx < 0) | (idx >= n)
    bad_value = ~torch.isfinite(b).all(1)
    no_area = (x2.clamp(0, w) <= x1.clamp(0, w)) | (y2.clamp(0, h) <= y1.clamp(0, h))
    bad = bad_index | bad_value | no_area
    if not bool(bad.any()):
        return
    k = int(bad.nonzero()[0, 0])
    coords = ", ".join(f"{name}={float(v):g}" for name, v in zip(("x1", "y1", "x2", "y2"), b[k]))
    where = f"box {k} [{coords}]"
    if bad_index[k]:
        raise IndexError(f"crop_boxes: {where} has box_image_index {int(idx[k])}, out of range for {n} images")
    if bad_value[k]:
        raise ValueError(f"crop_boxes: {where} has a non-finite coordinate")
    raise ValueError(
        f"crop_boxes: {where} of image {int(idx[k])} has no area after clamping to the image (W={w}, H={h})"
    )


def _axis(a: float, b: float, size: int, out: int) -> tuple[int, int, torch.Tensor]:
    """Support [lo, hi] and float32 sample positions (relative to lo) of one box axis, as the kernels do."""
    f32 = torch.float32
    c1 = torch.tensor(a, dtype=f32).clamp(0, size)
    c2 = torch.tensor(b, dtype=f32).clamp(0, size)
    lo = math.ceil(float(c1 - 0.5))
    hi = math.ceil(float(c2 - 0.5)) - 1
    if hi < lo:
        lo = hi = min(max(math.floor(float((c1 + c2) * 0.5)), 0), size - 1)
    step = (c2 - c1) / torch.tensor(float(out), dtype=f32)
    # fma(step, j + 0.5, -0.5) in float32: exact in float64, then one rounding.
    fma = (step.double() * (torch.arange(out, dtype=torch.float64) + 0.5) - 0.5).to(f32)
    rel = fma + (c1 - lo)
    return lo, hi, rel


def _stats_span(a: float, b: float, size: int) -> tuple[int, int]:
    """Pixels [lo, hi] one axis of a box touches (the depth statistics), as the kernels compute it in float32."""
    c1 = float(torch.tensor(a, dtype=torch.float32).clamp(0, size))
    c2 = float(torch.tensor(b, dtype=torch.float32).clamp(0, size))
    lo = min(math.floor(c1), size - 1)
    return lo, min(max(math.ceil(c2) - 1, lo), size - 1)


def crop_boxes_reference(
    images: torch.Tensor,
    boxes: torch.Tensor,
    box_image_index: torch.Tensor,
    out_size: int | Sequence[int],
    *,
    depth: torch.Tensor | None = None,
    mean: Sequence[float] | torch.Tensor | None = None,
    std: Sequence[float] | torch.Tensor | None = None,
) -> CropResult:
    """The sampling definition of ``crop_boxes`` in plain torch, one box at a time (slow; for tests and
    benchmarks, never called by ``crop_boxes``): slice the support, then ``F.grid_sample`` (bilinear, border
    padding, ``align_corners=False``) at the float32 sample positions, in float64; depth statistics over the
    sliced pixels the box touches. Same arguments and result."""
    oh, ow = _out_size(out_size)
    _check_tensors(images, boxes, box_image_index, depth)
    _check_boxes(boxes, box_image_index, images)
    h, w = _image_hw(images)
    colour = images.permute(0, 3, 1, 2).double() / 255.0 if images.dtype == torch.uint8 else images.double()
    m = torch.tensor(_channel_values(mean, "mean") or [0.0] * 3, dtype=torch.float64).view(3, 1, 1)
    s = torch.tensor(_channel_values(std, "std") or [1.0] * 3, dtype=torch.float64).view(3, 1, 1)
    crops, depth_crops, stats = [], [], []
    for box, n in zip(boxes.to(torch.float32).cpu().tolist(), box_image_index.cpu().tolist()):
        xlo, xhi, xs = _axis(box[0], box[2], w, ow)
        ylo, yhi, ys = _axis(box[1], box[3], h, oh)
        # grid_sample(align_corners=False) maps g to pixel ((g + 1) * n - 1) / 2 and border-clamps to [0, n - 1].
        gx = (2 * xs.double() + 1) / (xhi - xlo + 1) - 1
        gy = (2 * ys.double() + 1) / (yhi - ylo + 1) - 1
        grid = torch.stack(torch.broadcast_tensors(gx.view(1, ow), gy.view(oh, 1)), dim=-1)[None].to(colour.device)
        region = colour[n, :, ylo : yhi + 1, xlo : xhi + 1]
        sample = F.grid_sample(region[None], grid, mode="bilinear", padding_mode="border", align_corners=False)[0]
        crops.append(((sample - m.to(sample.device)) / s.to(sample.device)).float())
        if depth is not None:
            dregion = depth[n, ylo : yhi + 1, xlo : xhi + 1].double()
            dsample = F.grid_sample(dregion[None, None], grid, padding_mode="border", align_corners=False)[0]
            depth_crops.append(dsample.float())
            (sxlo, sxhi), (sylo, syhi) = _stats_span(box[0], box[2], w), _stats_span(box[1], box[3], h)
            flat = depth[n, sylo : syhi + 1, sxlo : sxhi + 1].double().flatten()
            stats.append(torch.stack([flat.median(), flat.mean(), flat.min()]).float())
    dev = images.device
    out = torch.stack(crops) if crops else torch.empty((0, 3, oh, ow), device=dev)
    if depth is None:
        return CropResult(out, None, None)
    dc = torch.stack(depth_crops) if depth_crops else torch.empty((0, 1, oh, ow), device=dev)
    st = torch.stack(stats) if stats else torch.empty((0, 3), device=dev)
    return CropResult(out, dc, st)
