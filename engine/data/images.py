"""Image and depth-map file I/O with errors that name the file.

- ``load_image``: any PIL-readable file → uint8 [H, W, 3] RGB tensor (the reference decoder; DALI is the fast one).
- ``load_depth``: float32 [H, W] tensor in [0, 1], 0 = nearest. Formats: ``.npy`` (float in [0, 1], or uint16
  scaled by 1/65535; never pickled), 16-bit greyscale PNG (/65535), 8-bit greyscale PNG (/255), and a Spectral_r
  colour-mapped PNG (inverted as the SIFThinker release does, see depth_colormap). A colour PNG whose three
  channels agree within 2 everywhere is read like the release reads it: first channel / 255.
- ``save_image`` / ``save_depth``: the writers the synthetic generator uses (PNG; depth as 16-bit PNG or .npy).

Every failure to read a file raises :class:`MediaError` (a ``ValueError``; :class:`MissingMediaError`, also a
``FileNotFoundError``, for a missing file) naming the file: a truncated or garbled file, an unsupported mode, an
image past PIL's decompression-bomb limit (``Image.MAX_IMAGE_PIXELS`` x 2). Training code catches it where a
record's media is first decoded and skips the record (``engine.data.schema.DecodedRecords``).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from engine.data.depth_colormap import spectral_r_to_depth

PathLike = str | os.PathLike

DECODE_ERRORS = (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)
"""What PIL raises on a bad file (``DecompressionBombError`` is none of the others)."""


class MediaError(ValueError):
    """An image or depth file cannot be used: unreadable, truncated, garbled or too large. Names the file."""


class MissingMediaError(MediaError, FileNotFoundError):
    """A media file does not exist."""


def _open(path: PathLike, what: str) -> Image.Image:
    path = Path(path)
    if not path.is_file():
        raise MissingMediaError(f"{what} file not found: {path}")
    try:
        img = Image.open(path)
        img.load()  # decode now so that truncated or corrupt data fail here, naming the file
    except DECODE_ERRORS as exc:
        raise MediaError(f"cannot decode {what} file {path}: {exc}") from exc
    return img


def load_image(path: PathLike) -> torch.Tensor:
    """Decode an image file to a uint8 [H, W, 3] RGB tensor. Raises FileNotFoundError / ValueError naming the file."""
    img = _open(path, "image")
    return torch.from_numpy(np.array(img.convert("RGB"), dtype=np.uint8))


def _depth_from_array(arr: np.ndarray, path: Path) -> np.ndarray:
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim != 2:
        raise MediaError(f"depth file {path}: expected a [H, W] map, got shape {arr.shape}")
    if arr.dtype == np.uint16:
        return arr.astype(np.float32) / np.float32(65535.0)
    if arr.dtype == np.uint8:
        return arr.astype(np.float32) / np.float32(255.0)
    if not np.issubdtype(arr.dtype, np.floating):
        raise MediaError(f"depth file {path}: unsupported dtype {arr.dtype} (float in [0, 1], uint8 or uint16)")
    arr = arr.astype(np.float32)
    if not np.isfinite(arr).all():
        raise MediaError(f"depth file {path}: contains non-finite values")
    if arr.size and (arr.min() < -1e-6 or arr.max() > 1.0 + 1e-6):
        raise MediaError(f"depth file {path}: values span [{arr.min()}, {arr.max()}], expected [0, 1]")
    return np.clip(arr, 0.0, 1.0)


def load_depth(path: PathLike) -> torch.Tensor:
    """Read a depth map as a float32 [H, W] tensor in [0, 1] (0 = near). See the module docstring for formats."""
    path = Path(path)
    if path.suffix.lower() == ".npy":
        if not path.is_file():
            raise MissingMediaError(f"depth file not found: {path}")
        try:
            arr = np.load(path, allow_pickle=False)
        except (ValueError, OSError, EOFError) as exc:
            raise MediaError(f"cannot read depth file {path}: {exc}") from exc
        return torch.from_numpy(_depth_from_array(arr, path))
    img = _open(path, "depth")
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.array(img)
        if arr.dtype != np.uint16:
            if arr.min() < 0 or arr.max() > 65535:
                raise MediaError(f"depth file {path}: integer values outside the 16-bit range")
            arr = arr.astype(np.uint16)
        return torch.from_numpy(_depth_from_array(arr, path))
    if img.mode == "L":
        return torch.from_numpy(_depth_from_array(np.array(img), path))
    rgb = np.array(img.convert("RGB"), dtype=np.uint8)
    spread = rgb.max(axis=-1).astype(np.int16) - rgb.min(axis=-1)
    if rgb.size and spread.max() <= 2:
        return torch.from_numpy(rgb[..., 0].astype(np.float32) / np.float32(255.0))
    return torch.from_numpy(spectral_r_to_depth(rgb))


def save_image(path: PathLike, rgb: np.ndarray | torch.Tensor, optimize: bool = False) -> None:
    """Write uint8 [H, W, 3] RGB to a file whose format follows the suffix (PNG: lossless; ``optimize`` makes it
    ~8 % smaller at ~10x the encode time)."""
    arr = rgb.numpy() if isinstance(rgb, torch.Tensor) else np.asarray(rgb)
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[-1] != 3:
        raise ValueError(f"{path}: expected uint8 [H, W, 3], got {arr.dtype} {arr.shape}")
    Image.fromarray(arr).save(path, optimize=optimize)


def save_depth(path: PathLike, depth: np.ndarray | torch.Tensor, optimize: bool = False) -> None:
    """Write float depth [H, W] in [0, 1]: ``.npy`` as float32, ``.png`` as 16-bit greyscale (round(d · 65535))."""
    path = Path(path)
    arr = depth.numpy() if isinstance(depth, torch.Tensor) else np.asarray(depth)
    arr = _depth_from_array(np.asarray(arr, dtype=np.float32), path)
    if path.suffix.lower() == ".npy":
        np.save(path, arr)
    elif path.suffix.lower() == ".png":
        Image.fromarray(np.round(arr * 65535.0).astype(np.uint16)).save(path, optimize=optimize)
    else:
        raise ValueError(f"{path}: depth is saved as .npy or .png")
