"""engine.ops.crop_boxes: the native op against plain-torch oracles (slice + F.interpolate for integer boxes,
crop_boxes_reference for any box), edge cases, errors, opcheck and torch.compile. CUDA tests are marked gpu."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from engine import ops
from engine.ops import CropResult, crop_boxes, crop_boxes_reference

MEAN = (0.48145466, 0.4578275, 0.40821073)  # the Qwen2.5-VL / CLIP constants
STD = (0.26862954, 0.26130258, 0.27577711)
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def _images(n: int, h: int, w: int, uint8: bool, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    rgb = torch.randint(0, 256, (n, h, w, 3), dtype=torch.uint8, generator=g)
    depth = torch.rand((n, h, w), generator=g)
    return (rgb if uint8 else rgb.permute(0, 3, 1, 2).float() / 255.0), depth


def _as_chw01(images: torch.Tensor) -> torch.Tensor:
    return images.permute(0, 3, 1, 2).float() / 255.0 if images.dtype == torch.uint8 else images


def _assert_matches(got: CropResult, want: CropResult, atol: float = 1e-4) -> None:
    torch.testing.assert_close(got.crops, want.crops, atol=atol, rtol=0)
    if want.depth_crops is None:
        assert got.depth_crops is None and got.depth_stats is None
        return
    torch.testing.assert_close(got.depth_crops, want.depth_crops, atol=atol, rtol=0)
    torch.testing.assert_close(got.depth_stats[:, 0], want.depth_stats[:, 0], atol=0, rtol=0)  # median: exact
    torch.testing.assert_close(got.depth_stats[:, 1], want.depth_stats[:, 1], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(got.depth_stats[:, 2], want.depth_stats[:, 2], atol=0, rtol=0)  # min: exact


@pytest.mark.parametrize("uint8", [True, False])
@pytest.mark.parametrize("out_size", [(7, 11), (32, 32), (1, 5)])
def test_integer_boxes_equal_slice_and_interpolate(uint8: bool, out_size: tuple[int, int]) -> None:
    images, depth = _images(3, 29, 41, uint8)
    boxes = torch.tensor([[0, 0, 41, 29], [3, 4, 20, 28], [10, 7, 11, 8], [40, 0, 41, 29], [5, 5, 9, 6]])
    index = torch.tensor([0, 2, 1, 1, 0])
    got = crop_boxes(images, boxes.float(), index, out_size, depth=depth, mean=MEAN, std=STD)
    chw = _as_chw01(images)
    m, s = torch.tensor(MEAN).view(3, 1, 1), torch.tensor(STD).view(3, 1, 1)
    for k, ((x1, y1, x2, y2), n) in enumerate(zip(boxes.tolist(), index.tolist())):
        region = chw[n, :, y1:y2, x1:x2]
        want = F.interpolate(region[None], out_size, mode="bilinear", align_corners=False)[0]
        torch.testing.assert_close(got.crops[k], (want - m) / s, atol=1e-4, rtol=0)
        dregion = depth[n, y1:y2, x1:x2]
        dwant = F.interpolate(dregion[None, None], out_size, mode="bilinear", align_corners=False)[0]
        torch.testing.assert_close(got.depth_crops[k], dwant, atol=1e-5, rtol=0)
        stats = torch.stack([dregion.median(), dregion.mean(), dregion.min()])
        torch.testing.assert_close(got.depth_stats[k], stats, atol=1e-6, rtol=1e-5)


def test_large_integer_boxes_equal_interpolate_within_1e_4() -> None:
    # ~1000-pixel boxes of noise: a source index rounded differently from ATen's would show here (~1.5e-4).
    images, _ = _images(1, 1024, 1000, True, seed=5)
    boxes = torch.tensor([[3, 5, 1000, 1021], [100, 7, 987, 600], [0, 0, 1000, 1024]])
    got = crop_boxes(images, boxes.float(), torch.zeros(3, dtype=torch.int64), (448, 448), mean=MEAN, std=STD)
    m, s = torch.tensor(MEAN).view(3, 1, 1), torch.tensor(STD).view(3, 1, 1)
    for k, (x1, y1, x2, y2) in enumerate(boxes.tolist()):
        region = images[0, y1:y2, x1:x2].permute(2, 0, 1).float() / 255.0
        want = F.interpolate(region[None], (448, 448), mode="bilinear", align_corners=False)[0]
        torch.testing.assert_close(got.crops[k], (want - m) / s, atol=1e-4, rtol=0)


@st.composite
def _problems(draw: st.DrawFn) -> dict:
    n = draw(st.integers(1, 3))
    h, w = draw(st.integers(1, 24)), draw(st.integers(1, 24))
    k = draw(st.integers(1, 6))
    coord = st.one_of(st.integers(-8, 32).map(float), st.floats(-8.0, 32.0))  # integer and fractional corners
    boxes = []
    for _ in range(k):
        x1, y1 = draw(coord), draw(coord)
        # Keep a positive area after clamping: x1' < x2' and y1' < y2'.
        x1 = min(max(x1, -8.0), w - 0.01)
        y1 = min(max(y1, -8.0), h - 0.01)
        x2 = draw(st.floats(max(x1, 0.0) + 0.01, w + 8.0))
        y2 = draw(st.floats(max(y1, 0.0) + 0.01, h + 8.0))
        boxes.append([x1, y1, x2, y2])
    return {
        "n": n,
        "h": h,
        "w": w,
        "boxes": torch.tensor(boxes, dtype=torch.float32),
        "index": torch.tensor([draw(st.integers(0, n - 1)) for _ in range(k)]),
        "out_size": (draw(st.integers(1, 13)), draw(st.integers(1, 13))),
        "uint8": draw(st.booleans()),
        "with_depth": draw(st.booleans()),
        "normalise": draw(st.booleans()),
        "seed": draw(st.integers(0, 2**16)),
    }


@settings(max_examples=80, deadline=None)
@given(p=_problems())
def test_random_boxes_match_reference(p: dict) -> None:
    images, depth = _images(p["n"], p["h"], p["w"], p["uint8"], p["seed"])
    kwargs = {"depth": depth if p["with_depth"] else None}
    if p["normalise"]:
        kwargs.update(mean=MEAN, std=STD)
    got = crop_boxes(images, p["boxes"], p["index"], p["out_size"], **kwargs)
    want = crop_boxes_reference(images, p["boxes"], p["index"], p["out_size"], **kwargs)
    _assert_matches(got, want)


def test_boxes_partly_outside_are_clamped() -> None:
    images, depth = _images(1, 20, 30, True)
    outside = torch.tensor([[-10.0, -5.0, 12.0, 8.0], [25.0, 15.0, 99.0, 40.0]])
    inside = torch.tensor([[0.0, 0.0, 12.0, 8.0], [25.0, 15.0, 30.0, 20.0]])
    index = torch.zeros(2, dtype=torch.int64)
    a = crop_boxes(images, outside, index, (9, 9), depth=depth)
    b = crop_boxes(images, inside, index, (9, 9), depth=depth)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, atol=0, rtol=0)


def test_one_pixel_and_sub_pixel_boxes_use_one_pixel() -> None:
    images, depth = _images(1, 10, 12, True)
    # A whole pixel, a sub-pixel box around a pixel centre, and one between centres (-> pixel holding its centre).
    boxes = torch.tensor([[4.0, 3.0, 5.0, 4.0], [7.4, 2.4, 7.6, 2.6], [2.55, 5.55, 2.95, 5.95]])
    pixels = [(3, 4), (2, 7), (5, 2)]  # (row, col)
    got = crop_boxes(images, boxes, torch.zeros(3, dtype=torch.int64), (3, 5), depth=depth)
    for k, (r, c) in enumerate(pixels):
        expected = images[0, r, c].float() / 255.0
        torch.testing.assert_close(got.crops[k], expected.view(3, 1, 1).expand(3, 3, 5), atol=1e-6, rtol=0)
        torch.testing.assert_close(got.depth_crops[k], depth[0, r, c].expand(1, 3, 5), atol=0, rtol=0)
        torch.testing.assert_close(got.depth_stats[k], depth[0, r, c].expand(3), atol=0, rtol=0)


def test_depth_stats_read_the_pixels_a_box_touches() -> None:
    # Statistics use columns floor(x1) .. ceil(x2) - 1 (rows alike), the rule of engine.data.boxes, while the
    # crops sample the pixels whose centres lie inside. Every row is [.2, .8, .8, .8]: the box x ∈ [0.8, 2.0)
    # touches columns 0 and 1 (mean 0.5) though its only centre inside is column 1's (crop = 0.8).
    depth = torch.tensor([0.2, 0.8, 0.8, 0.8]).repeat(4, 1)[None]
    images = torch.zeros(1, 4, 4, 3, dtype=torch.uint8)
    boxes = torch.tensor([[0.8, 0.0, 2.0, 4.0], [0.9, 1.2, 1.1, 1.4], [-3.0, 3.5, 0.5, 9.0]])
    got = crop_boxes(images, boxes, torch.zeros(3, dtype=torch.int64), (2, 3), depth=depth)
    torch.testing.assert_close(got.depth_crops[0], torch.full((1, 2, 3), 0.8))
    # box 1: a sub-pixel box across the column 0|1 edge touches both (row 1); the crops read the pixel holding its
    # centre, column 1. Box 2 is clamped to column 0, row 3.
    torch.testing.assert_close(got.depth_crops[1], torch.full((1, 2, 3), 0.8))
    want = torch.tensor([[0.2, 0.5, 0.2], [0.2, 0.5, 0.2], [0.2, 0.2, 0.2]])
    torch.testing.assert_close(got.depth_stats, want)
    ref = crop_boxes_reference(images, boxes, torch.zeros(3, dtype=torch.int64), (2, 3), depth=depth)
    torch.testing.assert_close(ref.depth_stats, want)


def test_fractional_box_touches_only_pixels_with_centres_inside() -> None:
    # Pixels outside the support (centres outside the box) are set to 255; a box whose support is columns 2..4
    # and rows 1..3 must never see them, whatever the output size.
    images = torch.full((1, 6, 8, 3), 255, dtype=torch.uint8)
    images[0, 1:4, 2:5] = 0
    boxes = torch.tensor([[1.6, 0.7, 5.4, 4.3]])
    got = crop_boxes(images, boxes, torch.zeros(1, dtype=torch.int64), (17, 23))
    assert float(got.crops.abs().max()) == 0.0


def test_empty_batch_gives_empty_outputs() -> None:
    images, depth = _images(2, 8, 8, True)
    got = crop_boxes(images, torch.empty(0, 4), torch.empty(0, dtype=torch.int64), (5, 7), depth=depth)
    assert got.crops.shape == (0, 3, 5, 7) and got.depth_crops.shape == (0, 1, 5, 7)
    assert got.depth_stats.shape == (0, 3)
    plain = crop_boxes(images, torch.empty(0, 4), torch.empty(0, dtype=torch.int64), 5)
    assert plain.crops.shape == (0, 3, 5, 5) and plain.depth_crops is None and plain.depth_stats is None


def test_median_is_lower_median_and_nan_propagates() -> None:
    depth = torch.arange(1.0, 9.0).view(1, 2, 4).clone()  # a 2x4 box: values 1..8, lower median 4
    images = torch.zeros(1, 2, 4, 3, dtype=torch.uint8)
    boxes = torch.tensor([[0.0, 0.0, 4.0, 2.0], [0.0, 0.0, 2.0, 2.0]])  # second: 1, 2, 5, 6 -> 2
    got = crop_boxes(images, boxes, torch.zeros(2, dtype=torch.int64), 2, depth=depth)
    torch.testing.assert_close(got.depth_stats, torch.tensor([[4.0, 4.5, 1.0], [2.0, 3.5, 1.0]]))
    depth[0, 0, 1] = float("nan")
    got = crop_boxes(images, boxes, torch.zeros(2, dtype=torch.int64), 2, depth=depth)
    assert torch.isnan(got.depth_stats).all()


def test_large_boxes_median_matches_torch() -> None:
    # Boxes above the small-box threshold take the histogram path; smooth, constant and spiky depth maps.
    h, w = 96, 128
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    smooth = (0.2 + 0.5 * (xx + 2 * yy) / (w + 2 * h)).float()
    spiky = torch.rand(h, w, generator=torch.Generator().manual_seed(3)) * 1e-3
    spiky[5, 7] = 1e6
    depth = torch.stack([smooth, torch.full((h, w), 0.25), spiky])
    images = torch.zeros(3, h, w, 3, dtype=torch.uint8)
    boxes = torch.tensor([[0.0, 0.0, 128.0, 96.0], [10.0, 3.0, 100.0, 90.0]]).repeat(3, 1)
    index = torch.arange(3).repeat_interleave(2)
    got = crop_boxes(images, boxes, index, 4, depth=depth).depth_stats
    for k, ((x1, y1, x2, y2), n) in enumerate(zip(boxes.long().tolist(), index.tolist())):
        region = depth[n, y1:y2, x1:x2]
        torch.testing.assert_close(
            got[k], torch.stack([region.median(), region.mean(), region.min()]), rtol=1e-5, atol=0
        )


def test_non_contiguous_inputs_and_thread_counts_agree() -> None:
    images, depth = _images(2, 31, 33, True)
    boxes = torch.tensor([[1.5, 2.0, 30.0, 29.5], [0.0, 0.0, 7.0, 5.0]])
    index = torch.tensor([1, 0])
    base = crop_boxes(images, boxes, index, (12, 10), depth=depth, mean=MEAN, std=STD)
    strided = images.permute(0, 3, 1, 2).contiguous().permute(0, 2, 3, 1)  # same values, channels-first memory
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        other = crop_boxes(
            strided, boxes.t().contiguous().t(), index, (12, 10), depth=depth.mT.contiguous().mT, mean=MEAN, std=STD
        )
    finally:
        torch.set_num_threads(threads)
    for x, y in zip(base, other):
        torch.testing.assert_close(x, y, atol=0, rtol=0)


def _error_case(name: str) -> tuple[tuple, dict]:
    images, depth = _images(2, 10, 10, True)
    boxes = torch.tensor([[0.0, 0.0, 5.0, 5.0], [1.0, 1.0, 4.0, 4.0], [2.0, 2.0, 6.0, 6.0]])
    index = torch.tensor([0, 1, 0])
    kwargs: dict = {"depth": depth}
    if name == "index":
        index = torch.tensor([0, 1, 2])
    elif name == "negative_index":
        index = torch.tensor([0, -1, 0])
    elif name == "no_area":
        boxes[2] = torch.tensor([12.0, 2.0, 15.0, 6.0])  # entirely right of the 10-pixel-wide image
    elif name == "inverted":
        boxes[2] = torch.tensor([6.0, 2.0, 2.0, 6.0])
    elif name == "nan":
        boxes[2, 1] = float("nan")
    elif name == "depth_shape":
        kwargs["depth"] = depth[:, :9]
    elif name == "depth_dtype":
        kwargs["depth"] = depth.double()
    elif name == "image_dtype":
        images = images.to(torch.int32)
    elif name == "image_shape":
        images = images.permute(0, 3, 1, 2)
    elif name == "device":
        boxes = boxes.to("meta")
    elif name == "std":
        kwargs.update(mean=MEAN, std=(0.2, 0.0, 0.2))
    elif name == "mean_len":
        kwargs.update(mean=(0.5, 0.5))
    elif name == "out_size":
        return (images, boxes, index, (0, 4)), kwargs
    return (images, boxes, index, (4, 4)), kwargs


@pytest.mark.parametrize(
    ("case", "exc", "match"),
    [
        ("index", IndexError, r"box 2 \[x1=2, y1=2, x2=6, y2=6\].*box_image_index 2.*2 images"),
        ("negative_index", IndexError, r"box 1 .*box_image_index -1"),
        ("no_area", ValueError, r"box 2 \[x1=12, y1=2, x2=15, y2=6\].*no area"),
        ("inverted", ValueError, r"box 2 .*no area"),
        ("nan", ValueError, r"box 2 .*non-finite"),
        ("depth_shape", ValueError, r"depth must be \[N, H, W\]"),
        ("depth_dtype", ValueError, r"depth must be float32"),
        ("image_dtype", ValueError, r"uint8 .* or float32"),
        ("image_shape", ValueError, r"uint8 images must be \[N, H, W, 3\]"),
        ("device", ValueError, r"boxes is on meta"),
        ("std", ValueError, r"std must be > 0"),
        ("mean_len", ValueError, r"mean must be 3"),
        ("out_size", ValueError, r"out_size"),
    ],
)
def test_bad_input_raises_naming_the_problem(case: str, exc: type, match: str) -> None:
    args, kwargs = _error_case(case)
    with pytest.raises(exc, match=match):
        crop_boxes(*args, **kwargs)


@pytest.mark.parametrize(
    ("case", "exc", "match"),
    [
        ("index", IndexError, r"box 2 \[x1=2\.0+, .*box_image_index 2"),
        ("no_area", ValueError, r"box 2 .*no area after clamping"),
        ("nan", ValueError, r"box 2 .*non-finite"),
        ("depth_shape", ValueError, r"depth must be \[N, H, W\]"),
    ],
)
def test_native_op_checks_its_arguments_too(case: str, exc: type, match: str) -> None:
    (images, boxes, index, size), kwargs = _error_case(case)
    with pytest.raises(exc, match=match):
        torch.ops.sif.crop_boxes(images, boxes, index, list(size), kwargs["depth"], None, None)


def test_missing_extension_says_how_to_build(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ops, "_IMPORT_ERROR", ImportError("no engine._C"))
    images, _ = _images(1, 4, 4, True)
    with pytest.raises(RuntimeError, match=r"pip install --no-build-isolation -e \."):
        crop_boxes(images, torch.tensor([[0.0, 0.0, 2.0, 2.0]]), torch.zeros(1, dtype=torch.int64), 2)


@pytest.mark.parametrize("with_depth", [True, False])
@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(with_depth: bool, device: str) -> None:
    images, depth = _images(2, 12, 14, True)
    boxes = torch.tensor([[0.5, 1.0, 9.0, 11.0], [3.0, 0.0, 14.0, 4.5]], device=device)
    index = torch.tensor([1, 0], device=device)
    args = (images.to(device), boxes, index, [5, 6], depth.to(device) if with_depth else None, list(MEAN), list(STD))
    torch.library.opcheck(torch.ops.sif.crop_boxes.default, args)


def test_torch_compile_fullgraph() -> None:
    images, depth = _images(2, 16, 20, True)
    boxes = torch.tensor([[0.5, 1.0, 19.0, 15.0], [3.0, 2.0, 8.0, 9.5], [0.0, 0.0, 20.0, 16.0]])
    index = torch.tensor([1, 0, 1])

    def focus(images: torch.Tensor, boxes: torch.Tensor, index: torch.Tensor, depth: torch.Tensor) -> torch.Tensor:
        out = crop_boxes(images, boxes, index, (8, 8), depth=depth, mean=MEAN, std=STD)
        return out.crops.sum() + out.depth_crops.mean() + out.depth_stats[:, 0].sum()

    compiled = torch.compile(focus, fullgraph=True)  # inductor: the fake kernel, functionalisation, codegen
    torch.testing.assert_close(compiled(images, boxes, index, depth), focus(images, boxes, index, depth))


@pytest.mark.gpu
@pytest.mark.parametrize("uint8", [True, False])
def test_cuda_matches_cpu_and_reference(uint8: bool) -> None:
    images, depth = _images(3, 300, 257, uint8)
    g = torch.Generator().manual_seed(1)
    k = 200
    xy = torch.rand(k, 2, generator=g) * torch.tensor([260.0, 300.0]) - 10  # x1 < 250 < W, y1 < 290 < H
    wh = torch.rand(k, 2, generator=g) * 300 + 10.05  # x2, y2 > 0: every box keeps an area once clamped
    boxes = torch.cat([xy, xy + wh], 1)
    index = torch.randint(0, 3, (k,), generator=g)
    cpu = crop_boxes(images, boxes, index, (37, 64), depth=depth, mean=MEAN, std=STD)
    cuda = crop_boxes(images.cuda(), boxes.cuda(), index.cuda(), (37, 64), depth=depth.cuda(), mean=MEAN, std=STD)
    _assert_matches(CropResult(*(t.cpu() for t in cuda)), cpu)
    ref = crop_boxes_reference(images, boxes[:20], index[:20], (37, 64), depth=depth, mean=MEAN, std=STD)
    _assert_matches(CropResult(*(t[:20].cpu() for t in cuda)), ref)
