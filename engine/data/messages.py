"""The SIF chat turn of a record: its scalar depth map, and the messages and images the model sees.

Shared by the SFT examples (``engine.train.sft``: the messages plus the reference trace) and the GRPO prompts
(``engine.rl.prompts``: the messages with the generation prompt). The user turn is
``sif_user_content(question, with_depth)``: the RGB image, optionally the colour-mapped depth image (the record's
``depth_image`` PNG, else the scalar depth coloured with Spectral_r), then the question and the SIF instruction.
"""

from __future__ import annotations

import torch

from engine.data.depth_colormap import depth_to_spectral_r, spectral_r_to_depth
from engine.data.images import MediaError, load_depth, load_image
from engine.data.schema import Record
from engine.data.sif_format import sif_user_content


def record_depth(record: Record) -> torch.Tensor | None:
    """Scalar depth float32 [H, W] in [0, 1] of a record, or None when it has neither depth file."""
    if record.depth is not None:
        return load_depth(record.depth)
    if record.depth_image is not None:
        return spectral_r_to_depth(load_image(record.depth_image)).to(torch.float32)
    return None


def sif_messages(
    record: Record, with_depth: bool, rgb: torch.Tensor, depth: torch.Tensor | None, response: str | None = None
) -> tuple[list[dict], list[torch.Tensor]]:
    """Chat messages (plus the assistant ``response`` when given) and their images in order."""
    images = [rgb]
    if with_depth:
        if record.depth_image is not None:
            images.append(load_image(record.depth_image))
        elif depth is not None:
            images.append(depth_to_spectral_r(depth))
        else:
            raise MediaError(f"record {record.id}: the prompt shows a depth image but the record has no depth file")
    messages: list[dict] = [{"role": "user", "content": sif_user_content(record.question, with_depth=with_depth)}]
    if response is not None:
        messages.append({"role": "assistant", "content": response})
    return messages, images
