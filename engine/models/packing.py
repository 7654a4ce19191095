"""Pack variable-length multimodal sequences into one row and score their target tokens from hidden states.

Both objectives (GRPO on sampled completion tokens, SFT on assistant tokens) train on a *subset* of positions.
``pack_sequences`` concatenates B sequences with no padding (``cu_seqlens`` delimits them, M-RoPE positions
restart per sequence) and records, for every scored token, the packed row whose hidden state predicts it (the
previous position of the same sequence) and its slot in a left-aligned ``[B, L]`` layout (L = the most scored
tokens of any sequence). Only those N rows of the hidden states are multiplied by the LM head, by the fused
kernel ``sif_kernels.linear_token_logprobs``: no [T, V] logits ever exist. Under FSDP2, ``model.lm_head_weight``
is still gathered after the forward (``engine.distributed.parallelize`` keeps the root unsharded).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

from engine.models.config import ModelConfig
from engine.models.generate import Rollout
from engine.models.rope import mrope_position_ids
from sif_kernels import linear_token_logprobs


@dataclass
class PackedBatch:
    """B sequences packed into T tokens, with N scored tokens.

    input_ids int64 [T]; position_ids int64 [3, T]; cu_seqlens int32 [B+1];
    pixel_values float [P, patch_dim] | None and image_grid_thw int64 [n, 3] | None for all images in order;
    source_rows int64 [N]: the packed row whose hidden state predicts each scored token;
    target_ids int64 [N]: the scored tokens; seq_index / slot int64 [N]: their place in the [B, L] layout;
    mask bool [B, L]: True at the first (number of scored tokens of sequence b) slots of row b.
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    cu_seqlens: torch.Tensor
    pixel_values: torch.Tensor | None
    image_grid_thw: torch.Tensor | None
    source_rows: torch.Tensor
    target_ids: torch.Tensor
    seq_index: torch.Tensor
    slot: torch.Tensor
    mask: torch.Tensor

    @property
    def num_sequences(self) -> int:
        return self.cu_seqlens.numel() - 1

    @property
    def num_tokens(self) -> int:
        return self.input_ids.numel()

    @property
    def num_targets(self) -> int:
        return self.target_ids.numel()

    def to(self, device: torch.device | str) -> PackedBatch:
        """A copy with every tensor on ``device`` (non-blocking)."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        return PackedBatch(**{k: v.to(device, non_blocking=True) if v is not None else None for k, v in values.items()})

    def scatter(self, values: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
        """Per-target values [N] -> [B, L] (``fill`` where ``mask`` is False); differentiable."""
        out = values.new_full(tuple(self.mask.shape), fill)
        return out.index_put((self.seq_index, self.slot), values)


def pack_sequences(
    input_ids: Sequence[torch.Tensor],
    target_masks: Sequence[torch.Tensor],
    config: ModelConfig,
    pixel_values: Sequence[torch.Tensor | None] | None = None,
    image_grid_thw: Sequence[torch.Tensor | None] | None = None,
) -> PackedBatch:
    """Pack sequences ``input_ids[b]`` int64 [T_b] whose tokens ``target_masks[b]`` bool [T_b] are scored.

    A scored token is predicted from the previous position, so ``target_masks[b][0]`` must be False.
    ``pixel_values[b]`` / ``image_grid_thw[b]``: that sequence's images (None without images).
    """
    b = len(input_ids)
    if b == 0:
        raise ValueError("pack_sequences: no sequences")
    if len(target_masks) != b:
        raise ValueError(f"pack_sequences: {b} sequences but {len(target_masks)} target masks")
    pixel_values = list(pixel_values) if pixel_values is not None else [None] * b
    image_grid_thw = list(image_grid_thw) if image_grid_thw is not None else [None] * b
    if len(pixel_values) != b or len(image_grid_thw) != b:
        raise ValueError(f"pack_sequences: {b} sequences but {len(pixel_values)}/{len(image_grid_thw)} image entries")
    positions, rows, slots, seqs, counts = [], [], [], [], []
    offset = 0
    for i, (ids, mask) in enumerate(zip(input_ids, target_masks)):
        if ids.dim() != 1 or mask.shape != ids.shape or mask.dtype != torch.bool:
            raise ValueError(
                f"pack_sequences: sequence {i}: input_ids must be [T] and its target mask bool [T]; got "
                f"{tuple(ids.shape)} and {mask.dtype} {tuple(mask.shape)}"
            )
        if bool(mask[0]):
            raise ValueError(f"pack_sequences: sequence {i}: its first token cannot be scored (nothing predicts it)")
        positions.append(mrope_position_ids(ids, image_grid_thw[i], config))
        where = mask.nonzero().squeeze(1)
        rows.append(where - 1 + offset)
        slots.append(torch.arange(where.numel()))
        seqs.append(torch.full((where.numel(),), i, dtype=torch.long))
        counts.append(where.numel())
        offset += ids.numel()
    lengths = torch.tensor([ids.numel() for ids in input_ids])
    cu = F.pad(torch.cumsum(lengths, 0), (1, 0)).to(torch.int32)
    all_ids = torch.cat(list(input_ids))
    source_rows = torch.cat(rows)
    width = max(max(counts), 1)
    mask_bl = torch.arange(width)[None, :] < torch.tensor(counts)[:, None]
    pv = [p for p in pixel_values if p is not None]
    grids = [g for g in image_grid_thw if g is not None]
    return PackedBatch(
        input_ids=all_ids,
        position_ids=torch.cat(positions, dim=1),
        cu_seqlens=cu,
        pixel_values=torch.cat(pv) if pv else None,
        image_grid_thw=torch.cat(grids) if grids else None,
        source_rows=source_rows,
        target_ids=all_ids[source_rows + 1],
        seq_index=torch.cat(seqs),
        slot=torch.cat(slots),
        mask=mask_bl,
    )


def pack_rollouts(rollouts: Sequence[Rollout], config: ModelConfig) -> PackedBatch:
    """Pack rollouts with their sampled (completion) tokens as targets; spliced view tokens are never scored."""
    return pack_sequences(
        [r.input_ids for r in rollouts],
        [r.completion_mask for r in rollouts],
        config,
        [r.pixel_values for r in rollouts],
        [r.image_grid_thw for r in rollouts],
    )


def packed_hidden(model: nn.Module, packed: PackedBatch) -> torch.Tensor:
    """Hidden states [N, H] at the rows predicting the scored tokens (one packed forward; via ``__call__`` so
    FSDP2's hooks run)."""
    hidden = model(packed.input_ids, packed.position_ids, packed.cu_seqlens, packed.pixel_values, packed.image_grid_thw)
    return hidden.index_select(0, packed.source_rows)


def target_logprobs(
    model: nn.Module, packed: PackedBatch, temperature: float = 1.0, return_entropy: bool = False
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """fp32 [N] log p(target | prefix) at ``temperature`` (and the entropy [N]), via the fused linear kernel."""
    hidden = packed_hidden(model, packed)
    return linear_token_logprobs(
        hidden, model.lm_head_weight, packed.target_ids, temperature, return_entropy=return_entropy
    )
