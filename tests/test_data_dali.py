"""DALI decoding: equality with PIL, pixel-budget resize, corrupt files skipped and named, sharding, GPU path."""

import numpy as np
import pytest
import torch
from PIL import Image

from engine.data import bundled_dataset_dir
from engine.data.dali import CorruptImageError, DaliImageLoader, check_encoded, shard_order, smart_resize
from engine.data.images import load_depth, load_image, save_depth
from engine.data.schema import load_records


def test_smart_resize_rule():
    assert smart_resize(60, 80, min_pixels=784, max_pixels=3136) == (28, 56)
    assert smart_resize(81, 80, min_pixels=784, max_pixels=3136) == (56, 28)
    assert smart_resize(1000, 1000) == (980, 980)  # 1008^2 exceeds 28*28*1280, scaled down
    assert smart_resize(10, 10, min_pixels=3136) == (56, 56)
    assert smart_resize(224, 224) == (224, 224)
    with pytest.raises(ValueError, match="aspect ratio"):
        smart_resize(1, 500)


def _smooth_image(rng, h, w):
    """Low-frequency colour image (JPEG artefacts stay small, as in photos)."""
    y, x = np.mgrid[0:h, 0:w] / max(h, w)
    phase = rng.uniform(0, 6, size=3)
    chans = [127 + 120 * np.sin(6 * x * (k + 1) + 4 * y + phase[k]) for k in range(3)]
    return np.clip(np.stack(chans, -1), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("dali")
    rng = np.random.default_rng(0)
    paths = []
    for i in range(6):
        img = _smooth_image(rng, 90 + 13 * i, 120)
        if i % 2:
            p = d / f"{i}.jpg"
            Image.fromarray(img).save(p, quality=90)  # 4:2:0 chroma subsampling
        else:
            p = d / f"{i}.png"
            Image.fromarray(img).save(p)
        save_depth(d / f"{i}_depth.png", rng.random((9, 12)).astype(np.float32))
        paths.append(p)
    jpg = paths[1].read_bytes()
    (d / "cut.jpg").write_bytes(jpg[: len(jpg) // 2])
    png = paths[0].read_bytes()
    (d / "cut.png").write_bytes(png[: len(png) - 40])
    (d / "junk.jpg").write_bytes(b"definitely not an image")
    k = jpg.index(b"\xff\xc4")  # corrupt the Huffman table: passes the header check, fails inside the decoder
    (d / "huffman.jpg").write_bytes(jpg[: k + 5] + b"\xff" * 16 + jpg[k + 21 :])
    return d, paths


def _pil(path):
    return np.array(Image.open(path).convert("RGB")).astype(int)


def test_cpu_decode_equals_pil(image_dir):
    d, paths = image_dir
    loader = DaliImageLoader(paths, 4, max_pixels=None, depth_paths=[d / f"{i}_depth.png" for i in range(6)])
    seen = []
    for batch in loader:
        assert not batch.skipped
        for i, img, depth in zip(batch.indices, batch.images, batch.depths):
            assert img.dtype == torch.uint8 and img.shape == _pil(paths[i]).shape
            assert np.abs(img.numpy().astype(int) - _pil(paths[i])).max() <= 1, paths[i]
            assert torch.equal(depth, load_depth(d / f"{i}_depth.png"))
            seen.append(i)
    assert seen == list(range(6)) and len(loader) == 2


def test_resize_to_pixel_budget(image_dir):
    _, paths = image_dir
    loader = DaliImageLoader(paths, 3, min_pixels=28 * 28, max_pixels=28 * 28 * 12)
    for batch in loader:
        for i, img in zip(batch.indices, batch.images):
            src = Image.open(paths[i]).convert("RGB")
            h, w = smart_resize(src.height, src.width, min_pixels=28 * 28, max_pixels=28 * 28 * 12)
            assert tuple(img.shape) == (h, w, 3)
            ref = np.array(src.resize((w, h), Image.BILINEAR)).astype(int)
            assert np.abs(img.numpy().astype(int) - ref).mean() < 3.0


def test_corrupt_files_are_named_and_skipped(image_dir, caplog):
    d, paths = image_dir
    bad = [d / "cut.jpg", d / "cut.png", d / "junk.jpg", d / "missing.png", d / "huffman.jpg"]
    all_paths = [paths[0], bad[0], paths[1], bad[1], bad[2], paths[2], bad[3], bad[4], paths[3]]
    loader = DaliImageLoader(all_paths, 3, max_pixels=None)
    for _epoch in range(2):
        kept, skipped = [], []
        for batch in loader:
            kept += batch.indices
            skipped += batch.skipped
        assert kept == [0, 2, 5, 8]
        reasons = {path: reason for _, path, reason in skipped}
        assert set(reasons) == {str(p) for p in bad}
        assert "truncated JPEG" in reasons[str(bad[0])] and "truncated PNG" in reasons[str(bad[1])]
        assert "not a decodable image" in reasons[str(bad[2])] and "unreadable" in reasons[str(bad[3])]
        assert "decode failed" in reasons[str(bad[4])]
    assert len(loader.skipped) == 5  # the second epoch does not re-read known-bad files
    assert "huffman.jpg" in caplog.text
    with pytest.raises(CorruptImageError, match="name.jpg: truncated JPEG"):
        check_encoded((d / "cut.jpg").read_bytes(), "name.jpg")


def test_loader_from_bundled_records():
    records, _ = load_records(bundled_dataset_dir("heldout") / "records.jsonl")
    records = records[:4]
    loader = DaliImageLoader.from_records(records, 4, max_pixels=None)
    (batch,) = list(loader)
    assert batch.indices == [0, 1, 2, 3]
    for i, img, depth in zip(batch.indices, batch.images, batch.depths):
        assert torch.equal(img, load_image(records[i].image))  # PNG: lossless, exact
        assert torch.equal(depth, records[i].load_depth_map())


def test_sharding():
    shards = [shard_order(11, r, 3, shuffle=True, seed=5, epoch=0) for r in range(3)]
    assert all(len(s) == 3 for s in shards)
    flat = sorted(i for s in shards for i in s)
    assert len(set(flat)) == 9 and all(0 <= i < 11 for i in flat)
    assert shards[0] == shard_order(11, 0, 3, shuffle=True, seed=5, epoch=0)
    assert shards[0] != shard_order(11, 0, 3, shuffle=True, seed=5, epoch=1)
    assert shard_order(5, 1, 2, shuffle=False, seed=0, epoch=0, drop_uneven=False) == [1, 3]
    with pytest.raises(ValueError, match="shard_id 3"):
        shard_order(5, 3, 3, False, 0, 0)


@pytest.mark.gpu
def test_gpu_mixed_decode_matches_cpu(image_dir):
    pytest.importorskip("nvidia.dali", reason="DALI is not installed here (the GPU machine cannot carry it)")
    _, paths = image_dir
    cpu = [img for b in DaliImageLoader(paths, 6, max_pixels=None) for img in b.images]
    gpu = [img for b in DaliImageLoader(paths, 6, max_pixels=None, device="gpu") for img in b.images]
    for c, g in zip(cpu, gpu):
        assert g.is_cuda and g.shape == c.shape
        assert (g.cpu().int() - c.int()).abs().float().mean() < 1.0
