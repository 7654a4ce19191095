"""The vision-language model: vision tower + Qwen2 decoder + lm_head, Qwen2.5-VL-compatible.

Training and scoring call the packed forward, ``model(...)`` or its named alias :meth:`VLModel.forward_packed`
(packed tokens, no padding), and get hidden states after the final norm; the loss kernels multiply by
:attr:`VLModel.lm_head_weight` themselves, so full logits are never materialised. :meth:`VLModel.logits` is the
HF-shaped batched entry point for comparison and debugging.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .config import ModelConfig
from .decoder import CacheView, Decoder, KVCache
from .rope import inv_freq, mrope_cos_sin, mrope_position_ids
from .vision import VisionTower


class VLModel(nn.Module):
    """Parameter names mirror the hub checkpoints: ``visual.*``, ``model.*``, ``lm_head.weight``."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        config.validate()
        self.config = config
        self.visual = VisionTower(config.vision)
        self.model = Decoder(config.text)
        self.lm_head = (
            None
            if config.tie_word_embeddings
            else nn.Linear(config.text.hidden_size, config.text.vocab_size, bias=False)
        )
        self.gradient_checkpointing = False

    def set_gradient_checkpointing(self, enabled: bool = True) -> None:
        """Recompute each decoder layer and vision block in backward instead of storing its activations."""
        self.gradient_checkpointing = enabled
        self.visual.gradient_checkpointing = enabled

    @property
    def lm_head_weight(self) -> torch.Tensor:
        """[V, H]: the untied lm_head, or the embedding matrix when tied."""
        return self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    def embed(
        self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None, image_grid_thw: torch.Tensor | None
    ) -> torch.Tensor:
        """Token embeddings [T, H] with every image-pad token replaced by its vision-tower output row."""
        x = self.model.embed_tokens(input_ids)
        is_image = input_ids == self.config.image_token_id
        n_pads = int(is_image.sum())
        if pixel_values is None:
            if n_pads:
                raise ValueError(f"{n_pads} image tokens in input_ids but no pixel_values")
            return x
        feats = self.visual(pixel_values, image_grid_thw)
        if feats.shape[0] != n_pads:
            raise ValueError(f"image_grid_thw gives {feats.shape[0]} image tokens, input_ids holds {n_pads}")
        return x.masked_scatter(is_image.unsqueeze(-1), feats.to(x.dtype))

    def rope(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """M-RoPE cos/sin [T, head_dim] for position_ids [3, T].

        The frequencies are recomputed in fp32 on every call (head_dim/2 values) rather than kept as a buffer, so
        that ``model.to(bfloat16)`` or meta-device init can never degrade them.
        """
        freqs = inv_freq(self.config.text.head_dim, self.config.text.rope_theta, position_ids.device)
        return mrope_cos_sin(position_ids, freqs, self.config.text.mrope_section, dtype)

    def run_layers(
        self,
        x: torch.Tensor,
        position_ids: torch.Tensor,
        cu_seqlens: torch.Tensor | None,
        cache: KVCache | None = None,
        view: CacheView | None = None,
    ) -> torch.Tensor:
        """Decoder layers + final norm on packed embeddings x [T, H] → hidden [T, H]."""
        cos, sin = self.rope(position_ids.to(x.device), x.dtype)
        ckpt = self.gradient_checkpointing and torch.is_grad_enabled() and cache is None
        for i, layer in enumerate(self.model.layers):
            layer_cache = None if cache is None else (cache.k[i], cache.v[i], view)
            if ckpt:
                x = checkpoint(layer, x, cos, sin, cu_seqlens, use_reentrant=False)
            else:
                x = layer(x, cos, sin, cu_seqlens, layer_cache)
        return self.model.norm(x)

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        cu_seqlens: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        image_grid_thw: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Packed forward (call it as ``model(...)`` or ``model.forward_packed(...)``).

        input_ids int64 [T], position_ids int64 [3, T] (M-RoPE, per sequence), cu_seqlens int32 [B+1],
        pixel_values [P, patch_dim] / image_grid_thw [n, 3] for the images of all sequences in order
        → hidden states [T, H] after the final norm (in the parameters' dtype).
        """
        if input_ids.dim() != 1 or position_ids.shape != (3, input_ids.shape[0]):
            raise ValueError(
                f"forward_packed: input_ids must be [T] and position_ids [3, T]; got {tuple(input_ids.shape)} and "
                f"{tuple(position_ids.shape)}"
            )
        x = self.embed(input_ids, pixel_values, image_grid_thw)
        return self.run_layers(x, position_ids, cu_seqlens)

    def forward_packed(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        cu_seqlens: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        image_grid_thw: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The packed forward by name: ``model(...)`` with the same arguments and result (shapes: :meth:`forward`).

        Goes through ``__call__``, not ``forward``, so that module hooks (FSDP2 unshard/reshard, profilers) run.
        """
        return self(input_ids, position_ids, cu_seqlens, pixel_values, image_grid_thw)

    def logits(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_grid_thw: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """HF-shaped forward: input_ids [B, T] (left or right padded), attention_mask [B, T], images of all rows in
        order → logits [B, T, V] in the parameters' dtype, zero at padded positions. Rows are packed internally,
        so padding costs no compute."""
        b, t = input_ids.shape
        mask = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        rows = [input_ids[i][mask[i]] for i in range(b)]
        grids = self._split_grids(rows, image_grid_thw)
        positions = [mrope_position_ids(r, g, self.config) for r, g in zip(rows, grids)]
        lens = torch.tensor([len(r) for r in rows])
        cu = F.pad(torch.cumsum(lens, 0), (1, 0)).to(torch.int32)
        hidden = self.forward_packed(torch.cat(rows), torch.cat(positions, dim=1), cu, pixel_values, image_grid_thw)
        logits_packed = F.linear(hidden, self.lm_head_weight)
        out = logits_packed.new_zeros(b, t, logits_packed.shape[-1])
        out[mask] = logits_packed
        return out

    def _split_grids(self, rows: list[torch.Tensor], image_grid_thw: torch.Tensor | None) -> list[torch.Tensor | None]:
        if image_grid_thw is None:
            return [None] * len(rows)
        merge2 = self.config.vision.spatial_merge_size**2
        tokens = (image_grid_thw.prod(-1) // merge2).tolist()
        out, k = [], 0
        for r in rows:
            n_pad, first = int((r == self.config.image_token_id).sum()), k
            while n_pad > 0:
                if k >= len(tokens):
                    raise ValueError("image_grid_thw has fewer images than the image tokens in input_ids")
                n_pad -= tokens[k]
                k += 1
            out.append(image_grid_thw[first:k] if k > first else None)
        return out
