"""SIF prompts from records: the chat messages, the images the model sees and the ground truth for the rewards.

The user turn is ``sif_user_content(question, with_depth)``: the RGB image, optionally the colour-mapped depth
image (the record's ``depth_image`` PNG, else the scalar depth coloured with Spectral_r), then the question and
the fixed SIF instruction. The scalar depth used by the depth reward and the crop views is the record's ``depth``
file, else the depth read back from ``depth_image`` (nearest palette entry). Images are decoded at full
resolution; the processor resizes them to its pixel budget, the crop hook crops the originals.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.data.depth_colormap import depth_to_spectral_r, spectral_r_to_depth
from engine.data.images import MediaError, load_depth, load_image
from engine.data.schema import Record
from engine.data.sif_format import sif_user_content
from engine.models import Processor
from engine.rl.rewards import RewardTarget


@dataclass
class SIFPrompt:
    """One record, ready to generate from.

    inputs: ``Processor.apply_chat_template`` output (input_ids [T], pixel_values, image_grid_thw).
    rgb: uint8 [H, W, 3] at decoded resolution. depth: float32 [H, W] in [0, 1] (0 near) or None.
    """

    record: Record
    inputs: dict[str, torch.Tensor | None]
    rgb: torch.Tensor
    depth: torch.Tensor | None
    target: RewardTarget


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


def reward_target(record: Record, depth: torch.Tensor | None) -> RewardTarget:
    return RewardTarget(
        record_id=record.id,
        question=record.question,
        answer=record.answer,
        answer_type=record.answer_type,
        gt_boxes=[list(b) for b in record.gt_boxes],
        depth=depth,
        options=record.options,
    )


def build_prompt(record: Record, processor: Processor, *, with_depth: bool) -> SIFPrompt:
    """Decode a record's images and tokenise its SIF prompt (generation prompt appended)."""
    rgb = load_image(record.image)
    depth = record_depth(record)
    if depth is not None and tuple(depth.shape) != tuple(rgb.shape[:2]):
        raise MediaError(
            f"record {record.id}: depth map is {tuple(depth.shape)} but the image is {tuple(rgb.shape[:2])}"
        )
    messages, images = sif_messages(record, with_depth, rgb, depth)
    inputs = processor.apply_chat_template(messages, images, add_generation_prompt=True)
    return SIFPrompt(record, inputs, rgb, depth, reward_target(record, depth))
