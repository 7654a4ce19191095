"""The tiny decoder's M-RoPE must resolve the image grid: each spatial axis needs rotary angles that differ
across the grid (or no head can tell a left object from a right one) without wrapping in its slowest pair."""

import math

import torch

from engine.models.rope import inv_freq
from engine.models.tiny import TINY_MAX_PIXELS, tiny_config


def axis_spans(config, tokens_across: int) -> dict[str, tuple[float, float]]:
    """Per M-RoPE axis: (slowest, fastest) rotation in radians between the first and the last of ``tokens_across``
    positions."""
    text = config.text
    freqs = inv_freq(text.head_dim, text.rope_theta)
    spans = {}
    for axis, chunk in zip(("t", "h", "w"), freqs.split(text.mrope_section)):
        spans[axis] = (float(chunk.min()) * (tokens_across - 1), float(chunk.max()) * (tokens_across - 1))
    return spans


def test_both_image_axes_are_resolved_across_the_default_grid() -> None:
    config = tiny_config()
    side = int(math.isqrt(TINY_MAX_PIXELS)) // (config.vision.patch_size * config.vision.spatial_merge_size)
    assert side == 8
    spans = axis_spans(config, side)
    for axis in ("h", "w"):
        slowest, fastest = spans[axis]
        assert fastest >= 1.5, f"{axis}: the fastest pair turns only {fastest:.3f} rad across {side} tokens"
        assert slowest < math.pi, f"{axis}: the slowest pair wraps ({slowest:.3f} rad across {side} tokens)"


def test_the_large_checkpoint_base_would_leave_the_width_axis_blind() -> None:
    """The check above fails for base 10 000 at this head size: the width axis turns by hundredths of a radian."""
    config = tiny_config()
    config.text.rope_theta = 10000.0
    assert axis_spans(config, 8)["w"][1] < 0.05


def test_text_positions_stay_distinct_over_a_prompt() -> None:
    """Two text positions 1..300 apart never share every rotary angle (mod 2π) to within 0.1 rad."""
    text = tiny_config().text
    freqs = inv_freq(text.head_dim, text.rope_theta).double()
    gaps = torch.arange(1, 301, dtype=torch.float64).unsqueeze(1) * freqs
    wrapped = torch.remainder(gaps + math.pi, 2 * math.pi) - math.pi
    assert float(wrapped.abs().max(1).values.min()) > 0.1
