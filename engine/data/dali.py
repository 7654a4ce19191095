"""DALI image decoding for training: encoded bytes in, uint8 RGB tensors resized to the model's pixel budget out.

Data flow per batch (one :class:`DaliImageLoader` per rank)::

    files of this rank's shard ──► read bytes + cheap integrity check (header, end marker) ──► skip + name bad ones
        ──► fn.external_source (bytes, target h/w) ──► fn.decoders.image (CPU: libjpeg-turbo / GPU: "mixed", nvJPEG)
        ──► fn.resize (bilinear, antialiased, to smart_resize's size) ──► torch uint8 [h, w, 3] per sample

- Devices: ``device="cpu"`` builds CPU operators with ``device_id=None`` (no GPU needed); ``device="gpu"`` decodes
  with ``device="mixed"`` and resizes on the current CUDA device.
- Pixel budget: Qwen2-VL's ``smart_resize`` rule: both sides multiples of ``factor`` (28 = patch 14 x merge 2),
  aspect ratio kept, area within [min_pixels, max_pixels]. ``max_pixels=None`` keeps the decoded size.
- Sharding: the (optionally per-epoch shuffled, same seed on every rank) sample order is split as
  ``order[shard_id::num_shards]``; with ``drop_uneven`` (default) every shard gets the same number of samples.
- Bad images never kill the pipeline: a missing, unreadable, unidentifiable or truncated file (JPEG without its
  end-of-image marker, PNG without IEND) is caught before it reaches DALI, named, logged and skipped. If DALI still
  fails on a batch (corrupt entropy-coded data), that batch is decoded per sample with PIL, the samples PIL cannot
  decode are skipped the same way, and the DALI pipeline is rebuilt (DALI invalidates a pipeline after an error).
- Depth maps (``.npy`` / 16-bit PNG / Spectral_r PNG) load beside their images at native resolution through
  :func:`engine.data.images.load_depth` (boxes are normalised, so depth needs no resize).
- EXIF orientation is not applied (as PIL and the HF processors do by default).
"""

from __future__ import annotations

import io
import logging
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from engine.data.images import load_depth
from engine.pixel_budget import DEFAULT_MAX_PIXELS, DEFAULT_MIN_PIXELS, PATCH_FACTOR, smart_resize

logger = logging.getLogger(__name__)

MAX_DECODED_PIXELS = 1 << 28


class CorruptImageError(ValueError):
    """An encoded image failed the integrity check or could not be decoded; the message names the file."""


def check_encoded(data: bytes, name: str) -> tuple[int, int]:
    """(height, width) of an encoded image after a cheap integrity check; raises CorruptImageError naming ``name``.

    Reads only the header (PIL) and the end of the stream: JPEG must hold an end-of-image marker in its last
    64 KiB (truncated files do not), PNG an IEND chunk in its last KiB.
    """
    try:
        with Image.open(io.BytesIO(data)) as img:
            fmt, (width, height) = img.format, img.size
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise CorruptImageError(f"{name}: not a decodable image ({exc})") from exc
    if width <= 0 or height <= 0 or width * height > MAX_DECODED_PIXELS:
        raise CorruptImageError(f"{name}: implausible size {width}x{height}")
    if fmt == "JPEG" and b"\xff\xd9" not in data[-65536:]:
        raise CorruptImageError(f"{name}: truncated JPEG (no end-of-image marker)")
    if fmt == "PNG" and b"IEND" not in data[-1024:]:
        raise CorruptImageError(f"{name}: truncated PNG (no IEND chunk)")
    return height, width


@dataclass
class DecodedBatch:
    """One batch: ``images[i]`` uint8 [h, w, 3] (CPU or CUDA) of dataset sample ``indices[i]``; ``depths[i]``
    float32 [H, W] (native size) when depth paths were given; ``skipped`` lists ``(index, path, reason)``."""

    images: list[torch.Tensor]
    indices: list[int]
    depths: list[torch.Tensor] | None = None
    skipped: list[tuple[int, str, str]] = field(default_factory=list)


def shard_order(
    num_samples: int, shard_id: int, num_shards: int, shuffle: bool, seed: int, epoch: int, drop_uneven: bool = True
) -> list[int]:
    """This shard's sample indices for ``epoch`` (identical permutation on every rank, then strided split)."""
    if not 0 <= shard_id < num_shards:
        raise ValueError(f"shard_id {shard_id} not in [0, {num_shards})")
    order = np.random.default_rng([seed, epoch]).permutation(num_samples) if shuffle else np.arange(num_samples)
    if drop_uneven:
        order = order[: (num_samples // num_shards) * num_shards]
    return [int(i) for i in order[shard_id::num_shards]]


class DaliImageLoader:
    """Iterate batches of decoded, resized images of ``paths`` (this rank's shard). See the module docstring.

    ``for batch in loader`` runs one epoch; ``loader.set_epoch(e)`` changes the shuffle. ``loader.skipped``
    accumulates every skipped sample as ``(index, path, reason)``.
    """

    def __init__(
        self,
        paths: Sequence[str | os.PathLike],
        batch_size: int,
        *,
        device: str = "cpu",
        num_threads: int = 2,
        min_pixels: int = DEFAULT_MIN_PIXELS,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
        factor: int = PATCH_FACTOR,
        depth_paths: Sequence[str | os.PathLike | None] | None = None,
        shard_id: int = 0,
        num_shards: int = 1,
        shuffle: bool = False,
        seed: int = 0,
        drop_uneven: bool = True,
    ):
        if device not in ("cpu", "gpu"):
            raise ValueError(f"device must be 'cpu' or 'gpu', got {device!r}")
        if device == "gpu" and not torch.cuda.is_available():
            raise RuntimeError("device='gpu' needs CUDA; use device='cpu'")
        if depth_paths is not None and len(depth_paths) != len(paths):
            raise ValueError(f"{len(depth_paths)} depth paths for {len(paths)} images")
        self.paths = [Path(p) for p in paths]
        self.depth_paths = None if depth_paths is None else [None if p is None else Path(p) for p in depth_paths]
        self.batch_size, self.device, self.num_threads = batch_size, device, num_threads
        self.min_pixels, self.max_pixels, self.factor = min_pixels, max_pixels, factor
        self.shard_id, self.num_shards, self.shuffle, self.seed = shard_id, num_shards, shuffle, seed
        self.drop_uneven = drop_uneven
        self.epoch = 0
        self.skipped: list[tuple[int, str, str]] = []
        self._known_bad: dict[int, tuple[int, str, str]] = {}  # not re-read in later epochs
        self._pipe = None

    @classmethod
    def from_records(cls, records: Sequence, batch_size: int, **kwargs) -> DaliImageLoader:
        """Loader over :class:`engine.data.schema.Record` images, with each record's depth (scalar file, else the
        colour-mapped image) beside it; ``batch.indices`` index ``records``."""
        depth = [r.depth or r.depth_image for r in records]
        return cls([r.image for r in records], batch_size, depth_paths=depth, **kwargs)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        n = len(shard_order(len(self.paths), self.shard_id, self.num_shards, False, 0, 0, self.drop_uneven))
        return math.ceil(n / self.batch_size)

    # --------------------------------------------------------------------------------------------- pipeline
    def _build(self):
        from nvidia.dali import fn, pipeline_def, types

        resize = self.max_pixels is not None
        decode_device = "mixed" if self.device == "gpu" else "cpu"
        device_id = torch.cuda.current_device() if self.device == "gpu" else None

        @pipeline_def(
            batch_size=self.batch_size,
            num_threads=self.num_threads,
            device_id=device_id,
            exec_async=False,
            exec_pipelined=False,
            prefetch_queue_depth=1,
        )
        def pipe():
            encoded = fn.external_source(name="encoded", dtype=types.UINT8, ndim=1)
            images = fn.decoders.image(
                encoded,
                device=decode_device,
                output_type=types.RGB,
                jpeg_fancy_upsampling=True,
                adjust_orientation=False,
            )
            if resize:
                h = fn.external_source(name="h", dtype=types.FLOAT, ndim=0)
                w = fn.external_source(name="w", dtype=types.FLOAT, ndim=0)
                images = fn.resize(images, resize_y=h, resize_x=w, interp_type=types.INTERP_LINEAR, antialias=True)
            return images

        p = pipe()
        p.build()
        return p

    def _to_torch(self, tensor_list) -> list[torch.Tensor]:
        from nvidia.dali.plugin.pytorch import feed_ndarray

        out = []
        for i in range(len(tensor_list)):
            t = tensor_list[i]
            if self.device == "gpu":
                dst = torch.empty(tuple(t.shape()), dtype=torch.uint8, device=torch.device("cuda"))
                feed_ndarray(t, dst, cuda_stream=torch.cuda.current_stream())
            else:
                dst = torch.from_numpy(np.array(t, copy=True))
            out.append(dst)
        return out

    def _target(self, h: int, w: int) -> tuple[int, int]:
        return smart_resize(h, w, self.factor, self.min_pixels, self.max_pixels)

    def _run_dali(self, encoded: list[np.ndarray], sizes: list[tuple[int, int]]) -> list[torch.Tensor]:
        if self._pipe is None:
            self._pipe = self._build()
        self._pipe.feed_input("encoded", encoded)
        if self.max_pixels is not None:
            targets = [self._target(h, w) for h, w in sizes]
            self._pipe.feed_input("h", [np.array(t[0], np.float32) for t in targets])
            self._pipe.feed_input("w", [np.array(t[1], np.float32) for t in targets])
        (images,) = self._pipe.run()
        if self.device == "gpu":
            torch.cuda.synchronize()
        return self._to_torch(images)

    def _run_pil(self, encoded: list[np.ndarray], names: list[str]) -> list[torch.Tensor | CorruptImageError]:
        """Per-sample fallback after a DALI batch failure: PIL decode + antialiased bilinear resize."""
        out: list[torch.Tensor | CorruptImageError] = []
        for data, name in zip(encoded, names):
            try:
                with Image.open(io.BytesIO(data.tobytes())) as img:
                    img = img.convert("RGB")
                    if self.max_pixels is not None:
                        h, w = self._target(img.height, img.width)
                        img = img.resize((w, h), Image.BILINEAR)
                    t = torch.from_numpy(np.array(img, dtype=np.uint8))
            except (OSError, ValueError, SyntaxError) as exc:
                out.append(CorruptImageError(f"{name}: decode failed ({exc})"))
                continue
            out.append(t.cuda() if self.device == "gpu" else t)
        return out

    # --------------------------------------------------------------------------------------------- iteration
    def _skip(self, batch: DecodedBatch, index: int, reason: str) -> None:
        entry = (index, str(self.paths[index]), reason)
        batch.skipped.append(entry)
        self.skipped.append(entry)
        self._known_bad[index] = entry
        logger.warning("skipping image %s", reason)

    def _decode(self, indices: list[int]) -> DecodedBatch:
        batch = DecodedBatch([], [], [] if self.depth_paths is not None else None)
        encoded, sizes, kept = [], [], []
        for i in indices:
            if i in self._known_bad:
                batch.skipped.append(self._known_bad[i])
                continue
            path = self.paths[i]
            try:
                data = path.read_bytes()
            except OSError as exc:
                self._skip(batch, i, f"{path}: unreadable ({exc.strerror or exc})")
                continue
            try:
                sizes.append(check_encoded(data, str(path)))
            except CorruptImageError as exc:
                self._skip(batch, i, str(exc))
                continue
            encoded.append(np.frombuffer(data, dtype=np.uint8))
            kept.append(i)
        if not kept:
            return batch
        try:
            images: list = self._run_dali(encoded, sizes)
        except RuntimeError as exc:
            logger.warning("DALI failed on a batch; decoding it per sample: %s", " ".join(str(exc).split())[:300])
            self._pipe = None  # DALI invalidates the pipeline after an error
            images = self._run_pil(encoded, [str(self.paths[i]) for i in kept])
        for i, img in zip(kept, images):
            if isinstance(img, CorruptImageError):
                self._skip(batch, i, str(img))
                continue
            if self.depth_paths is not None:
                dp = self.depth_paths[i]
                try:
                    batch.depths.append(load_depth(dp) if dp is not None else None)
                except (OSError, ValueError) as exc:
                    self._skip(batch, i, f"depth for {self.paths[i]}: {exc}")
                    continue
            batch.images.append(img)
            batch.indices.append(i)
        return batch

    def __iter__(self) -> Iterator[DecodedBatch]:
        order = shard_order(
            len(self.paths), self.shard_id, self.num_shards, self.shuffle, self.seed, self.epoch, self.drop_uneven
        )
        for start in range(0, len(order), self.batch_size):
            yield self._decode(order[start : start + self.batch_size])
