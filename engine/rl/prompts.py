"""SIF prompts from records: the tokenised chat turn, the images the model sees and the ground truth for the rewards.

The messages and the scalar depth come from ``engine.data.messages`` (the same turn SFT trains on). The scalar
depth used by the depth reward and the crop views is the record's ``depth`` file, else the depth read back from
``depth_image`` (nearest palette entry). Images are decoded at full resolution; the processor resizes them to its
pixel budget, the crop hook crops the originals.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.data.images import MediaError, load_image
from engine.data.messages import record_depth, sif_messages
from engine.data.schema import Record
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
