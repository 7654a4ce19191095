"""The v2 CUDA kernels of sif::crop_boxes (SIF_CROP_BOXES_KERNEL=v2, csrc/cuda/crop_boxes_cuda.cu) against the CPU
kernel, the reference and v1. All gpu-marked: v2 has not run yet where these tests were written (no GPU), so
the first GPU pass (``benchmarks/run_gpu.sh DEST build crop-v2``) is its validation.

The cases reach every path of v2: staged tiles (downscales up to ~2.6x) and tiles sampled from global memory
(larger downscales), upscales whose tiles share source pixels, output widths that are and are not multiples of
4, uint8 HWC and float CHW images, more than 65535 boxes (grid-stride loops), and depth maps that are noise,
constant (every value in one histogram bin), negative or hold a NaN.
"""

import math

import pytest
import torch

from engine.ops import CropResult, crop_boxes, crop_boxes_reference

pytestmark = pytest.mark.gpu
MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)


@pytest.fixture
def kernel(monkeypatch):
    """kernel("v1" | "v2"): select the CUDA kernels for the following calls (read by the op at each call)."""
    return lambda name: monkeypatch.setenv("SIF_CROP_BOXES_KERNEL", name)


def _images(n, h, w, uint8, seed=0):
    g = torch.Generator().manual_seed(seed)
    rgb = torch.randint(0, 256, (n, h, w, 3), dtype=torch.uint8, generator=g)
    depth = torch.rand((n, h, w), generator=g) * 10 - 2  # negative values too
    return (rgb if uint8 else rgb.permute(0, 3, 1, 2).float() / 255.0), depth


def _boxes(k, h, w, seed=1, max_side=None):
    g = torch.Generator().manual_seed(seed)
    side = torch.tensor([float(w), float(h)])
    xy = torch.rand(k, 2, generator=g) * (side + 20) - 10
    wh = torch.rand(k, 2, generator=g) * (max_side or side.max()) + 0.05
    boxes = torch.cat([xy, xy + wh], 1)
    boxes[:, 0::2] = boxes[:, 0::2].clamp(-10, w - 0.5)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(-10, h - 0.5)
    boxes[:, 2] = torch.maximum(boxes[:, 2], boxes[:, 0].clamp(min=0) + 0.05)
    boxes[:, 3] = torch.maximum(boxes[:, 3], boxes[:, 1].clamp(min=0) + 0.05)
    special = torch.tensor(
        [[0.0, 0.0, w, h], [2.0, 3.0, 3.0, 4.0], [1.4, 1.4, 1.6, 1.6], [w - 1.0, 0.0, w, h], [0.0, h - 1.0, w, h]]
    )
    return torch.cat([special, boxes])


def _cuda(images, boxes, index, out_size, depth, **kw):
    out = crop_boxes(
        images.cuda(), boxes.cuda(), index.cuda(), out_size, depth=None if depth is None else depth.cuda(), **kw
    )
    return CropResult(*(None if t is None else t.cpu() for t in out))


def _assert_same(got: CropResult, want: CropResult, atol: float = 1e-5) -> None:
    torch.testing.assert_close(got.crops, want.crops, atol=atol, rtol=0, equal_nan=True)
    if want.depth_crops is None:
        assert got.depth_crops is None and got.depth_stats is None
        return
    torch.testing.assert_close(got.depth_crops, want.depth_crops, atol=atol, rtol=0, equal_nan=True)
    stats, want_stats = got.depth_stats, want.depth_stats
    torch.testing.assert_close(stats[:, 0], want_stats[:, 0], atol=0, rtol=0, equal_nan=True)  # median: exact
    torch.testing.assert_close(stats[:, 1], want_stats[:, 1], atol=1e-6, rtol=1e-5, equal_nan=True)
    torch.testing.assert_close(stats[:, 2], want_stats[:, 2], atol=0, rtol=0, equal_nan=True)  # min: exact


@pytest.mark.parametrize("with_depth", [True, False])
@pytest.mark.parametrize("uint8", [True, False])
@pytest.mark.parametrize("out_size", [(37, 64), (448, 448), (7, 11), (1, 5), (130, 3)])
def test_v2_matches_cpu(kernel, out_size, uint8, with_depth):
    images, depth = _images(3, 300, 257, uint8)
    boxes = _boxes(120, 300, 257)
    index = torch.randint(0, 3, (boxes.shape[0],), generator=torch.Generator().manual_seed(2))
    depth = depth if with_depth else None
    cpu = crop_boxes(images, boxes, index, out_size, depth=depth, mean=MEAN, std=STD)
    kernel("v2")
    _assert_same(_cuda(images, boxes, index, out_size, depth, mean=MEAN, std=STD), cpu)


@pytest.mark.parametrize("uint8", [True, False])
def test_v2_equals_v1_at_the_benchmark_shapes(kernel, uint8):
    """The benchmark's workload (1024^2 images, boxes of side 32..1024 -> 448^2): staged and unstaged tiles."""
    images, depth = _images(4, 1024, 1024, uint8, seed=3)
    g = torch.Generator().manual_seed(4)
    wh = torch.randint(32, 1025, (64, 2), generator=g)
    xy = (torch.rand((64, 2), generator=g) * (1024 - wh + 1)).long()
    boxes = torch.cat([xy, xy + wh], 1).float()
    index = torch.randint(0, 4, (64,), generator=g)
    args = (images, boxes, index, (448, 448), depth)
    kernel("v1")
    v1 = _cuda(*args, mean=MEAN, std=STD)
    kernel("v2")
    v2 = _cuda(*args, mean=MEAN, std=STD)
    _assert_same(v2, v1, atol=1e-6)
    ref = crop_boxes_reference(images, boxes[:4], index[:4], (448, 448), depth=depth, mean=MEAN, std=STD)
    _assert_same(CropResult(*(t[:4] for t in v2)), ref, atol=1e-4)


def test_v2_large_downscale_reads_global_memory(kernel):
    """Tiles whose source rectangle exceeds the 32 KiB stage (1000-pixel boxes to 16 x 16) sample directly."""
    images, depth = _images(2, 1000, 1000, True, seed=5)
    boxes = torch.tensor([[0.0, 0.0, 1000.0, 1000.0], [10.5, 20.25, 990.0, 700.0], [0.0, 0.0, 1000.0, 40.0]])
    index = torch.tensor([0, 1, 1])
    for out_size in [(16, 16), (3, 200)]:
        cpu = crop_boxes(images, boxes, index, out_size, depth=depth)
        kernel("v2")
        _assert_same(_cuda(images, boxes, index, out_size, depth), cpu)


def test_v2_depth_edge_cases(kernel):
    """Constant depth (one histogram bin), a NaN inside one box (NaN statistics for that box only), -0.0 and 0.0."""
    images, depth = _images(3, 64, 80, True, seed=6)
    depth[0] = 2.5
    depth[1, 10, 20] = float("nan")
    depth[2, :32] = -0.0
    depth[2, 32:] = 0.0
    boxes = torch.tensor([[0.0, 0.0, 80.0, 64.0], [15.0, 5.0, 30.0, 15.0], [40.0, 20.0, 80.0, 64.0], [0, 16, 80, 48]])
    index = torch.tensor([0, 1, 1, 2])
    cpu = crop_boxes(images, boxes, index, (20, 24), depth=depth)
    kernel("v2")
    got = _cuda(images, boxes, index, (20, 24), depth)
    _assert_same(got, cpu)
    assert got.depth_stats[1].isnan().all() and not got.depth_stats[2].isnan().any()


def test_v2_depth_stats_read_the_pixels_a_box_touches(kernel):
    """Statistics over columns floor(x1) .. ceil(x2) - 1 and rows alike (engine.data.boxes' rule, as v1 and the CPU
    kernel), not over the sampled pixels: fractional edges touched but not sampled, split over 3 x 3 tiles, and
    sub-pixel and last-pixel boxes. Distinct depth values, so one pixel too many or too few changes the stats."""
    g = torch.Generator().manual_seed(10)
    depth = torch.randperm(3 * 200 * 300, generator=g).float().view(3, 200, 300)
    images = torch.randint(0, 256, (3, 200, 300, 3), dtype=torch.uint8, generator=g)
    boxes = torch.tensor(
        [[0.8, 0.6, 150.2, 99.7], [10.9, 5.1, 290.3, 190.9], [3.4, 7.6, 3.6, 7.9], [299.5, 199.5, 300.0, 200.0]]
    )
    index = torch.tensor([0, 1, 2, 2])
    touched = [depth[n, int(y1) : math.ceil(y2), int(x1) : math.ceil(x2)] for n, (x1, y1, x2, y2) in zip(index, boxes)]
    want = torch.stack([torch.stack([d.median(), d.mean(), d.min()]) for d in touched])
    cpu = crop_boxes(images, boxes, index, (40, 150), depth=depth)
    torch.testing.assert_close(cpu.depth_stats, want)
    kernel("v2")
    _assert_same(_cuda(images, boxes, index, (40, 150), depth), cpu)


def test_v2_more_boxes_than_one_grid_dimension(kernel):
    images, depth = _images(2, 12, 9, True, seed=7)
    boxes = _boxes(70000, 12, 9, seed=8, max_side=6)
    index = torch.randint(0, 2, (boxes.shape[0],), generator=torch.Generator().manual_seed(9))
    cpu = crop_boxes(images, boxes, index, (2, 3), depth=depth)
    kernel("v2")
    _assert_same(_cuda(images, boxes, index, (2, 3), depth), cpu)


def test_unknown_kernel_name_raises(kernel):
    images, depth = _images(1, 8, 8, True)
    kernel("v3")
    with pytest.raises(ValueError, match="SIF_CROP_BOXES_KERNEL"):
        _cuda(images, torch.tensor([[0.0, 0.0, 4.0, 4.0]]), torch.zeros(1, dtype=torch.int64), (2, 2), depth)
