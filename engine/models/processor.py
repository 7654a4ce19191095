"""Qwen2.5-VL image preprocessing and the chat template that turns SIF messages into model inputs.

Images: ``smart_resize`` to a size whose sides are multiples of 28 (patch 14 × merge 2) and whose area lies in
[min_pixels, max_pixels], keeping the aspect ratio; bicubic resize; scale to [0, 1]; normalise with the CLIP
mean/std; cut into 14×14 patches, each duplicated over the temporal patch of 2, in merge-window order →
``pixel_values`` [P, 3*2*14*14] and ``grid_thw`` (1, h/14, w/14).

uint8 images are resized with PIL's bicubic filter on uint8 data, exactly as transformers' Qwen2-VL processor.
float [3, H, W] images in [0, 1] (e.g. crops) are not re-quantised: they pass unchanged when already at the
target size and are otherwise resized with torch's antialiased bicubic filter.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from engine.pixel_budget import smart_resize

from .tokenizer import IM_END, IM_START, IMAGE_PAD, VISION_END, VISION_START, Tokenizer

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
DEFAULT_SYSTEM = "You are a helpful assistant."


@dataclass
class ImageConfig:
    """preprocessor_config.json fields that matter."""

    min_pixels: int = 56 * 56
    max_pixels: int = 28 * 28 * 1280
    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    image_mean: tuple[float, ...] = CLIP_MEAN
    image_std: tuple[float, ...] = CLIP_STD

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ImageConfig:
        size = raw.get("size") or {}
        return cls(
            min_pixels=int(raw.get("min_pixels") or size.get("shortest_edge") or cls.min_pixels),
            max_pixels=int(raw.get("max_pixels") or size.get("longest_edge") or cls.max_pixels),
            patch_size=int(raw.get("patch_size", cls.patch_size)),
            temporal_patch_size=int(raw.get("temporal_patch_size", cls.temporal_patch_size)),
            merge_size=int(raw.get("merge_size", cls.merge_size)),
            image_mean=tuple(raw.get("image_mean", CLIP_MEAN)),
            image_std=tuple(raw.get("image_std", CLIP_STD)),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "image_processor_type": "Qwen2VLImageProcessor",
            "min_pixels": self.min_pixels,
            "max_pixels": self.max_pixels,
            "size": {"shortest_edge": self.min_pixels, "longest_edge": self.max_pixels},
            "patch_size": self.patch_size,
            "temporal_patch_size": self.temporal_patch_size,
            "merge_size": self.merge_size,
            "image_mean": list(self.image_mean),
            "image_std": list(self.image_std),
            "do_resize": True,
            "do_rescale": True,
            "rescale_factor": 1 / 255,
            "do_normalize": True,
            "do_convert_rgb": True,
            "resample": 3,
        }


@dataclass
class Processor:
    """Tokenizer + image preprocessing of one checkpoint."""

    tokenizer: Tokenizer
    image: ImageConfig = field(default_factory=ImageConfig)

    @property
    def factor(self) -> int:
        return self.image.patch_size * self.image.merge_size

    def target_size(self, height: int, width: int) -> tuple[int, int]:
        return smart_resize(height, width, self.factor, self.image.min_pixels, self.image.max_pixels)

    def _resized(self, image: torch.Tensor, index: int) -> torch.Tensor:
        """Any accepted image → float32 [3, h, w] in [0, 1] at the smart_resize size."""
        if image.dim() != 3:
            raise ValueError(f"image {index}: expected uint8 [H,W,3] or float [3,H,W], got shape {tuple(image.shape)}")
        if image.dtype == torch.uint8:
            if image.shape[2] != 3:
                raise ValueError(f"image {index}: uint8 images must be [H,W,3], got {tuple(image.shape)}")
            h, w = self.target_size(image.shape[0], image.shape[1])
            pil = Image.fromarray(image.cpu().numpy())
            if (h, w) != (image.shape[0], image.shape[1]):
                pil = pil.resize((w, h), Image.Resampling.BICUBIC)
            return torch.from_numpy(np.asarray(pil, dtype=np.float32) / np.float32(255.0)).permute(2, 0, 1)
        if not image.is_floating_point() or image.shape[0] != 3:
            raise ValueError(
                f"image {index}: expected uint8 [H,W,3] or float [3,H,W], got {image.dtype} {tuple(image.shape)}"
            )
        h, w = self.target_size(image.shape[1], image.shape[2])
        image = image.to(torch.float32)
        if (h, w) != tuple(image.shape[1:]):
            image = F.interpolate(image[None], size=(h, w), mode="bicubic", antialias=True, align_corners=False)[0]
        return image

    def preprocess_image(self, image: torch.Tensor, index: int = 0) -> tuple[torch.Tensor, tuple[int, int, int]]:
        """One image → (patches float32 [P, 3*T*p*p], grid (1, h/p, w/p))."""
        cfg = self.image
        x = self._resized(image, index)
        mean = torch.tensor(cfg.image_mean, dtype=torch.float32).view(3, 1, 1)
        std = torch.tensor(cfg.image_std, dtype=torch.float32).view(3, 1, 1)
        x = (x - mean) / std
        p, m, tp = cfg.patch_size, cfg.merge_size, cfg.temporal_patch_size
        c, h, w = x.shape
        gh, gw = h // p, w // p
        x = x.view(c, gh // m, m, p, gw // m, m, p).permute(1, 4, 2, 5, 0, 3, 6)  # (gh/m, gw/m, m, m, C, p, p)
        x = x.unsqueeze(5).expand(*x.shape[:5], tp, p, p)
        return x.reshape(gh * gw, c * tp * p * p), (1, gh, gw)

    def preprocess_images(self, images: list[torch.Tensor]) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Images → (pixel_values [P, patch_dim], image_grid_thw int64 [n, 3]); (None, None) for no images."""
        if not images:
            return None, None
        out = [self.preprocess_image(im, i) for i, im in enumerate(images)]
        return torch.cat([o[0] for o in out]), torch.tensor([o[1] for o in out], dtype=torch.long)

    def image_tokens(self, grid_thw: torch.Tensor) -> list[int]:
        """Number of LLM tokens (image pads) per image."""
        return (grid_thw.prod(-1) // self.image.merge_size**2).tolist()

    def render(self, messages: list[dict], add_generation_prompt: bool) -> tuple[list[str], list[bool]]:
        """Qwen2-VL chat template as text pieces and whether each piece is assistant output to train on.

        A missing system message becomes the default one; each image content part becomes
        ``<|vision_start|><|image_pad|><|vision_end|>`` (expanded later); the assistant's content and its
        ``<|im_end|>`` are marked for training.
        """
        pieces: list[tuple[str, bool]] = []
        if not messages or messages[0].get("role") != "system":
            pieces.append((f"{IM_START}system\n{DEFAULT_SYSTEM}{IM_END}\n", False))
        for i, msg in enumerate(messages):
            role, content = msg.get("role"), msg.get("content")
            if role not in ("system", "user", "assistant"):
                raise ValueError(f"message {i}: unknown role {role!r}")
            pieces.append((f"{IM_START}{role}\n", False))
            if isinstance(content, str):
                body = content
            elif isinstance(content, list):
                parts = []
                for j, part in enumerate(content):
                    kind = part.get("type")
                    if kind == "image":
                        parts.append(f"{VISION_START}{IMAGE_PAD}{VISION_END}")
                    elif kind == "text":
                        parts.append(part["text"])
                    else:
                        raise ValueError(f"message {i} part {j}: unsupported content type {kind!r}")
                body = "".join(parts)
            else:
                raise ValueError(f"message {i}: content must be a string or a list of parts")
            if role == "assistant":
                pieces.append((body + IM_END, True))
                pieces.append(("\n", False))
            else:
                pieces.append((body + f"{IM_END}\n", False))
        if add_generation_prompt:
            pieces.append((f"{IM_START}assistant\n", False))
        return [p[0] for p in pieces], [p[1] for p in pieces]

    def apply_chat_template(
        self, messages: list[dict], images: list[torch.Tensor] | None = None, add_generation_prompt: bool = False
    ) -> dict[str, torch.Tensor | None]:
        """Messages (HF-style content parts) + their images in order → model inputs.

        Returns input_ids int64 [T], pixel_values float32 [P, patch_dim] | None, image_grid_thw int64 [n, 3] | None
        and, when the conversation has an assistant turn, assistant_mask bool [T].
        """
        images = list(images or [])
        texts, trained = self.render(messages, add_generation_prompt)
        n_slots = sum(t.count(IMAGE_PAD) for t in texts)
        if n_slots != len(images):
            raise ValueError(f"messages have {n_slots} image parts but {len(images)} images were given")
        pixel_values, grid = self.preprocess_images(images)
        counts = iter(self.image_tokens(grid) if grid is not None else [])
        full, spans, pos = [], [], 0
        for text, train in zip(texts, trained):
            if IMAGE_PAD in text:
                chunks = text.split(IMAGE_PAD)
                text = chunks[0] + "".join(IMAGE_PAD * next(counts) + c for c in chunks[1:])
            if train:
                spans.append((pos, pos + len(text)))
            full.append(text)
            pos += len(text)
        ids, offsets = self.tokenizer.encode_with_offsets("".join(full))
        out: dict[str, torch.Tensor | None] = {
            "input_ids": torch.tensor(ids, dtype=torch.long),
            "pixel_values": pixel_values,
            "image_grid_thw": grid,
        }
        if any(trained):
            mask = [any(a <= s < b for a, b in spans) for s, _ in offsets]
            out["assistant_mask"] = torch.tensor(mask, dtype=torch.bool)
        return out

    def save(self, path: str | Path) -> None:
        """Write tokenizer.json and preprocessor_config.json into ``path``."""
        path = Path(path)
        self.tokenizer.save(path / "tokenizer.json")
        (path / "preprocessor_config.json").write_text(json.dumps(self.image.to_dict(), indent=2) + "\n")


def processor_from_pretrained(path: str | Path) -> Processor:
    """Tokenizer (tokenizer.json) + image preprocessing (preprocessor_config.json, defaults if absent)."""
    path = Path(path)
    tokenizer = Tokenizer.from_file(path)
    pre = path / "preprocessor_config.json"
    image = ImageConfig()
    if pre.is_file():
        try:
            image = ImageConfig.from_dict(json.loads(pre.read_text()))
        except (json.JSONDecodeError, TypeError, ValueError) as e:
            raise ValueError(f"{pre}: invalid preprocessor config ({e})") from e
    return Processor(tokenizer, image)
