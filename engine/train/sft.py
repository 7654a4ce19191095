"""Supervised fine-tuning on SIF traces: loss on assistant tokens only, packed, never holding [T, V] logits.

Each record becomes one conversation: the SIF user turn (RGB + colour-mapped depth image, question, instruction)
and the assistant turn ``record.response()`` (the canonical trace written by ``sif_format.format_response``).
``Processor.apply_chat_template`` marks the assistant tokens (the response and its ``<|im_end|>``); only those
are scored. With ``SFTViews(focus_mode="crop")`` the crop views of each area (exactly what the rollout focus hook
returns) follow its ``</area>`` inside the assistant turn; their tokens are inputs, never targets. Micro-batches
are packed (``engine.models.packing``) and the loss is the *summed* token cross-entropy, which the Trainer divides by
the global number of assistant tokens.

The head: on CUDA, Liger's fused linear cross-entropy (chunked matmul + CE + grad in one pass); on CPU, a plain
torch loop over row chunks, each under activation checkpointing, so at most one chunk's [rows, V] logits live at
a time, in forward and in backward.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from engine.data.focus import CropFocusHook
from engine.data.images import load_image
from engine.data.messages import record_depth, sif_messages
from engine.data.schema import DecodedRecords, Record, SkipReport
from engine.models import ModelConfig, Processor, Tokenizer
from engine.models.packing import PackedBatch, pack_sequences, packed_hidden
from engine.train.trainer import ObjectiveOutput

CE_CHUNK_ROWS = 1024
AREA_END = "</area>"


def _chunk_ce(hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(F.linear(hidden, weight).float(), target, reduction="sum")


def chunked_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, chunk_rows: int = CE_CHUNK_ROWS
) -> torch.Tensor:
    """Summed CE of ``hidden [N, H] @ weight[V, H].T`` against ``target [N]`` (fp32), ``chunk_rows`` rows at a time."""
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, hidden.shape[0], chunk_rows):
        rows = slice(start, start + chunk_rows)
        if torch.is_grad_enabled():
            total = total + checkpoint(_chunk_ce, hidden[rows], weight, target[rows], use_reentrant=False)
        else:
            total = total + _chunk_ce(hidden[rows], weight, target[rows])
    return total


def fused_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Summed token CE from hidden states: Liger's fused kernel on CUDA, the chunked torch loop elsewhere."""
    if hidden.is_cuda:
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

        return liger_fused_linear_cross_entropy(hidden, weight, target, reduction="sum")
    return chunked_cross_entropy(hidden, weight, target)


class SFTObjective:
    """``objective(model, PackedBatch) -> ObjectiveOutput``: summed CE over the assistant tokens."""

    def __call__(self, model: nn.Module, packed: PackedBatch) -> ObjectiveOutput:
        hidden = packed_hidden(model, packed)
        loss_sum = fused_linear_cross_entropy(hidden, model.lm_head_weight, packed.target_ids)
        return ObjectiveOutput(loss_sum, packed.num_targets, num_tokens=packed.num_tokens)


@dataclass
class SFTExample:
    """One tokenised conversation: input_ids int64 [T], assistant_mask bool [T], its images' patches / grids."""

    record_id: str
    input_ids: torch.Tensor
    assistant_mask: torch.Tensor
    pixel_values: torch.Tensor | None
    image_grid_thw: torch.Tensor | None


@dataclass
class SFTViews:
    """How SFT traces show their areas: ``text`` (boxes stay text) or ``crop`` (after every ``</area>`` the area's
    boxes are cropped, as the rollout hook does, and inserted as views, so a crop-mode policy is trained on the
    sequences it will generate). The view tokens are inputs only: never scored."""

    focus_mode: Literal["text", "crop"] = "text"
    max_views: int = 4
    crop_size: int = 112
    depth_views: bool = True


def prompt_shows_depth(with_depth: bool | None, views: SFTViews) -> bool:
    """Whether SFT prompts carry the depth image: ``with_depth`` when set, else what a rollout of the views'
    focusing mode shows (``RLConfig.depth_in_prompt``: crop yes, text no)."""
    return with_depth if with_depth is not None else views.focus_mode == "crop"


@dataclass
class _Prefix:
    """A focus request for the hook: the response up to and including one ``</area>``."""

    completion_text: str
    prompt_index: int = 0
    sample_index: int = 0


def _response_with_views(
    response: str, rgb: torch.Tensor, depth: torch.Tensor | None, views: SFTViews
) -> tuple[list[dict], list[torch.Tensor]]:
    """Assistant content parts with the crop views after each ``</area>``, and those views in order."""
    hook = CropFocusHook(
        [rgb], [depth], crop_size=(views.crop_size, views.crop_size), max_views=views.max_views,
        depth_views=views.depth_views,
    )  # fmt: skip
    parts: list[dict] = []
    images: list[torch.Tensor] = []
    pieces = response.split(AREA_END)
    done = ""
    for i, piece in enumerate(pieces):
        text = piece + (AREA_END if i < len(pieces) - 1 else "")
        parts.append({"type": "text", "text": text})
        done += text
        if i < len(pieces) - 1:
            crops = hook([_Prefix(done)])[0] or []
            parts += [{"type": "image"} for _ in crops]
            images += crops
    return parts, images


def scored_tokens(input_ids: torch.Tensor, assistant_mask: torch.Tensor, tokenizer: Tokenizer) -> torch.Tensor:
    """bool [T]: the assistant's tokens that are SFT targets, i.e. without the vision markers and image pads of views
    spliced into the assistant turn (inputs, never scored)."""
    vision = torch.tensor([tokenizer.vision_start_id, tokenizer.image_pad_id, tokenizer.vision_end_id])
    return assistant_mask & ~torch.isin(input_ids, vision)


def sft_example(
    record: Record, processor: Processor, *, with_depth: bool, max_seq_len: int, views: SFTViews | None = None
) -> SFTExample:
    """Tokenise a record's SIF conversation; right-truncate to ``max_seq_len`` (never inside an image)."""
    rgb = load_image(record.image)
    crop = views is not None and views.focus_mode == "crop"
    depth = record_depth(record) if crop or (with_depth and record.depth_image is None) else None
    response = record.response()
    messages, images = sif_messages(record, with_depth, rgb, depth, response=response)
    if crop:
        content, crops = _response_with_views(response, rgb, depth, views)
        messages[-1] = {"role": "assistant", "content": content}
        images = images + crops
    out = processor.apply_chat_template(messages, images)
    tok = processor.tokenizer
    ids = out["input_ids"]
    mask = scored_tokens(ids, out["assistant_mask"], tok)
    if ids.numel() > max_seq_len:
        last_image = int((ids == tok.vision_end_id).nonzero().max()) if bool((ids == tok.vision_end_id).any()) else -1
        if max_seq_len <= last_image:
            raise ValueError(
                f"record {record.id}: max_seq_len {max_seq_len} would cut inside an image (the last image ends "
                f"at token {last_image}); raise data.max_seq_len or lower data.max_pixels"
            )
        ids, mask = ids[:max_seq_len], mask[:max_seq_len]
    return SFTExample(record.id, ids, mask, out["pixel_values"], out["image_grid_thw"])


class SFTDataset(DecodedRecords[SFTExample]):
    """Records with traces, tokenised on access (images decoded lazily, so memory stays flat).

    A record whose media cannot be decoded (``engine.data.images.MediaError``: a truncated or garbled image, a
    missing depth file, no depth for a prompt that shows one) is skipped there, named ``file:line``, counted in the
    loader's SkipReport (``report``, default ``records.report``), and replaced by the next decodable record; the
    run stops with the list once more than ``max_skip_share`` of the records are skipped (see DecodedRecords).
    """

    def __init__(
        self,
        records: Sequence[Record],
        processor: Processor,
        *,
        with_depth: bool,
        max_seq_len: int,
        views: SFTViews | None = None,
        report: SkipReport | None = None,
        max_skip_share: float = 0.1,
    ) -> None:
        missing = [r.id for r in records if not r.trace]
        if missing:
            raise ValueError(f"SFT needs traces: {len(missing)} records have none (first: {missing[0]!r})")
        self.processor = processor
        self.with_depth = with_depth
        self.max_seq_len = max_seq_len
        self.views = views
        super().__init__(records, self._example, report=report, max_share=max_skip_share)

    def _example(self, record: Record) -> SFTExample:
        return sft_example(
            record, self.processor, with_depth=self.with_depth, max_seq_len=self.max_seq_len, views=self.views
        )


def collate_sft(
    examples: Sequence[SFTExample], config: ModelConfig, device: torch.device | str | None = None
) -> PackedBatch:
    """Pack examples with their assistant tokens as targets, on ``device`` when given (the training device: FSDP2
    moves the model's inputs itself, but the objective also indexes with the batch's ``source_rows``)."""
    packed = pack_sequences(
        [e.input_ids for e in examples],
        [e.assistant_mask for e in examples],
        config,
        [e.pixel_values for e in examples],
        [e.image_grid_thw for e in examples],
    )
    return packed.to(device) if device is not None else packed
