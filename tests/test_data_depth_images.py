"""Spectral_r colouring/inversion and image/depth file I/O."""

import matplotlib
import numpy as np
import pytest
import torch
from PIL import Image
from scipy.spatial import cKDTree

from engine.data.depth_colormap import depth_to_spectral_r, spectral_r_index, spectral_r_palette, spectral_r_to_depth
from engine.data.images import load_depth, load_image, save_depth, save_image


def test_palette_is_matplotlib_spectral_r():
    cmap = matplotlib.colormaps["Spectral_r"]
    assert cmap.N == 256
    expected = (cmap(np.arange(256))[:, :3] * 255).astype(np.uint8)  # integer lookup, as Depth Anything's run.py
    np.testing.assert_array_equal(spectral_r_palette(), expected)
    assert len({tuple(c) for c in spectral_r_palette()}) == 256


def test_colour_round_trip_and_near_is_red():
    rng = np.random.default_rng(0)
    depth = rng.uniform(2.0, 7.0, size=(64, 80)).astype(np.float32)
    depth[0, 0], depth[0, 1] = 2.0, 7.0
    rgb = depth_to_spectral_r(depth)
    assert rgb.dtype == np.uint8 and rgb.shape == (64, 80, 3)
    back = spectral_r_to_depth(rgb)
    norm = (depth.astype(np.float64) - 2.0) / 5.0
    assert back.dtype == np.float32
    assert np.abs(back - norm).max() <= 1 / 255 + 1e-6
    r, _, b = rgb[0, 0].astype(int)
    assert r > b  # nearest pixel is red
    r, _, b = rgb[0, 1].astype(int)
    assert b > r  # farthest is blue
    assert back[0, 0] == 0.0 and back[0, 1] == 1.0
    torch_back = spectral_r_to_depth(depth_to_spectral_r(torch.from_numpy(depth)))
    assert isinstance(torch_back, torch.Tensor) and torch.equal(torch_back, torch.from_numpy(back))


def test_every_palette_entry_inverts_exactly():
    idx = spectral_r_index(spectral_r_palette()[None])
    np.testing.assert_array_equal(idx[0], np.arange(256))


def test_off_palette_colours_match_a_kdtree_nearest_search():
    rng = np.random.default_rng(1)
    colours = rng.integers(0, 256, size=(5000, 3), dtype=np.uint8)
    palette = spectral_r_palette().astype(np.float64)
    dist, _ = cKDTree(palette).query(colours.astype(np.float64), k=1)
    ours = spectral_r_index(colours)
    ours_dist = np.sqrt(((palette[ours] - colours) ** 2).sum(-1))
    np.testing.assert_allclose(ours_dist, dist, atol=1e-9)


def test_depth_file_formats_round_trip(tmp_path):
    rng = np.random.default_rng(2)
    depth = rng.uniform(0, 1, size=(20, 30)).astype(np.float32)
    save_depth(tmp_path / "d.npy", depth)
    torch.testing.assert_close(load_depth(tmp_path / "d.npy"), torch.from_numpy(depth), rtol=0, atol=0)
    save_depth(tmp_path / "d.png", depth)
    assert Image.open(tmp_path / "d.png").mode.startswith("I")
    got = load_depth(tmp_path / "d.png")
    assert got.dtype == torch.float32 and got.shape == (20, 30)
    assert (got - torch.from_numpy(depth)).abs().max() <= 0.5 / 65535 + 1e-7
    save_image(tmp_path / "c.png", depth_to_spectral_r(depth))
    norm = (depth - depth.min()) / (depth.max() - depth.min())
    assert (load_depth(tmp_path / "c.png") - torch.from_numpy(norm)).abs().max() <= 1 / 255 + 1e-6
    Image.fromarray((depth * 255).astype(np.uint8)).save(tmp_path / "g.png")
    assert (load_depth(tmp_path / "g.png") - torch.from_numpy(depth)).abs().max() <= 1 / 255


def test_depth_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.npy"):
        load_depth(tmp_path / "missing.npy")
    np.save(tmp_path / "far.npy", np.full((4, 4), 3.0, np.float32))
    with pytest.raises(ValueError, match=r"far.npy: values span \[3.0, 3.0\]"):
        load_depth(tmp_path / "far.npy")
    np.save(tmp_path / "cube.npy", np.zeros((2, 4, 4), np.float32))
    with pytest.raises(ValueError, match=r"cube.npy: expected a \[H, W\] map"):
        load_depth(tmp_path / "cube.npy")
    (tmp_path / "junk.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(ValueError, match="cannot decode depth file .*junk.png"):
        load_depth(tmp_path / "junk.png")


def test_load_image_and_corrupt_files(tmp_path):
    rgb = np.random.default_rng(3).integers(0, 256, size=(16, 24, 3), dtype=np.uint8)
    save_image(tmp_path / "a.png", rgb)
    img = load_image(tmp_path / "a.png")
    assert img.dtype == torch.uint8 and torch.equal(img, torch.from_numpy(rgb))
    Image.fromarray(rgb).save(tmp_path / "a.jpg", quality=90)
    data = (tmp_path / "a.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="cannot decode image file .*cut.jpg"):
        load_image(tmp_path / "cut.jpg")
    with pytest.raises(FileNotFoundError, match="nope.png"):
        load_image(tmp_path / "nope.png")
