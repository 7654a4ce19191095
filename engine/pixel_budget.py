"""Qwen2-VL's pixel-budget rule, shared by the model's image processor and the DALI decode pipeline.

One definition so that what DALI resizes to is exactly what the processor expects (engine.data may not import
engine.models, so the rule lives beside both).
"""

from __future__ import annotations

import math

PATCH_FACTOR = 28
DEFAULT_MIN_PIXELS = 56 * 56
DEFAULT_MAX_PIXELS = 28 * 28 * 1280


def smart_resize(
    height: int,
    width: int,
    factor: int = PATCH_FACTOR,
    min_pixels: int = DEFAULT_MIN_PIXELS,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> tuple[int, int]:
    """Target (height, width): multiples of ``factor``, aspect ratio kept, area in [min_pixels, max_pixels].

    ``factor`` is patch size × spatial merge (14 × 2 for Qwen2.5-VL). Raises ValueError for an empty image or an
    aspect ratio over 200, as transformers does.
    """
    if height <= 0 or width <= 0:
        raise ValueError(f"smart_resize: image size must be positive, got {height}x{width}")
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"smart_resize: aspect ratio of {height}x{width} exceeds 200")
    h = max(factor, round(height / factor) * factor)
    w = max(factor, round(width / factor) * factor)
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * beta / factor) * factor
        w = math.ceil(width * beta / factor) * factor
    return h, w
