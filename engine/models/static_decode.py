"""The decode step with static shapes: one token for every cache row, fused q/k/v, no module hooks, a CUDA graph.

The general cached step (``generate._append_step``) goes through the model's modules: per layer three q/k/v
linears, two RoPE calls, the FSDP2 hooks of every block, Python per op, and a ``CacheView`` built on the CPU. That
is right for steps that splice images in, but a plain decode step is then bound by launch and dispatch cost,
not by the GPU: on an H200, a 0.5B model at batch 64 took 68 ms per step, with the GPU busy 3 % of the time.

:class:`StaticDecodeStep` runs the common step, where every row appends exactly the token it sampled, for all N
cache rows at once (rows that are already done compute a throw-away token):

- Each layer's q/k/v weights and biases are concatenated once per ``generate`` call, so a layer is one q/k/v
  matmul, one RoPE over q and k together, two cache writes, one attention, o_proj and the SwiGLU MLP. LoRA
  adapters are merged into the weights they adapt (so no adapter dropout while sampling). The norms call the
  modules' ``forward`` directly: their numerics are the model's, and module hooks (FSDP2's) are bypassed.
- The new K/V go to slot ``lengths[row]``; attention reads the cache slots under the mask ``slot <= length``:
  all of them in a CUDA graph, whose shapes then depend only on (N, cache capacity), never on the step; up to the
  longest row otherwise.
- Query heads are grouped by their KV head, [N, Hkv, Hq/Hkv, D], and attend as the "query length" of one SDPA
  call, so GQA needs no repeated K/V.
- On CUDA the step is captured once as a CUDA graph and replayed: one host→device copy of (tokens, positions,
  lengths) and one graph launch per token. The graph is captured again only if the cache is reallocated.

Decode tokens are text, whose three M-RoPE ids are equal; the step builds its tables with ``mrope_cos_sin`` and
rotates with ``apply_rope``, as the module path does on the CPU. Memory: one extra copy of the q/k/v weights
(about a sixth of the decoder's parameters for Qwen2.5-VL) and of every LoRA-adapted weight, for the duration of
the ``generate`` call. Use it with the parameters gathered (``engine.distributed.unsharded``), as rollouts are.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .decoder import KVCache
from .rope import apply_rope, inv_freq, mrope_cos_sin

Linear = tuple[torch.Tensor, torch.Tensor | None]  # (weight [out, in], bias [out] or None)


@dataclass
class _LayerWeights:
    """One decoder layer as the static step runs it: plain tensors, q/k/v fused ([(Hq + 2·Hkv)·D, H])."""

    qkv: Linear
    o_proj: Linear
    gate_proj: Linear
    up_proj: Linear
    down_proj: Linear
    input_norm: nn.Module
    post_norm: nn.Module


def _effective_linear(linear: nn.Linear) -> Linear:
    """(weight, bias) of a Linear as it computes now: a LoRA layer's enabled adapter is merged (dropout off)."""
    weight = linear.weight.detach()
    delta = getattr(linear, "delta_weight", None)
    if delta is not None and getattr(linear, "lora_enabled", False):
        weight = weight + delta().to(weight.dtype)
    bias = None if linear.bias is None else linear.bias.detach()
    return weight, bias


def _fused_qkv(attn: nn.Module) -> Linear:
    """q/k/v stacked into one Linear (Qwen2's q/k/v projections always carry a bias)."""
    parts = [_effective_linear(p) for p in (attn.q_proj, attn.k_proj, attn.v_proj)]
    return torch.cat([w for w, _ in parts]), torch.cat([b for _, b in parts])


class StaticDecodeStep:
    """Next-token logits for every row of a :class:`KVCache` after appending one token per row.

    ``step(tokens, positions, live)`` takes int64 CPU tensors: tokens / positions [N] (the token each row appends
    and its M-RoPE position id) and the ``live`` row indices. Every row writes K/V at its current length, but only
    live rows advance ``cache.lengths``: a finished row keeps overwriting one slot past its sequence, so it never
    makes the cache grow. Returns logits [N, V] in the model's dtype (a finished row's are meaningless). On CUDA
    (``cuda_graph``) the returned tensor is the graph's output buffer: read it before the next step.
    """

    def __init__(self, model: nn.Module, cache: KVCache, cuda_graph: bool = True) -> None:
        cfg = model.config.text
        self.cache = cache
        self.num_heads, self.num_kv_heads, self.head_dim = (
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.head_dim,
        )
        self.decoder_norm = model.model.norm
        self.embed_weight = model.model.embed_tokens.weight.detach()
        self.lm_head_weight = model.lm_head_weight.detach()
        self.device = self.lm_head_weight.device
        self.freqs = inv_freq(cfg.head_dim, cfg.rope_theta, self.device)
        self.mrope_section = cfg.mrope_section
        self.layers = []
        for layer in model.model.layers:
            mlp = layer.mlp
            self.layers.append(
                _LayerWeights(
                    _fused_qkv(layer.self_attn),
                    _effective_linear(layer.self_attn.o_proj),
                    _effective_linear(mlp.gate_proj),
                    _effective_linear(mlp.up_proj),
                    _effective_linear(mlp.down_proj),
                    layer.input_layernorm,
                    layer.post_attention_layernorm,
                )
            )
        rows = cache.lengths.shape[0]
        self.inputs = torch.zeros(3, rows, dtype=torch.long, device=self.device)  # tokens, positions, lengths
        self.row_index = torch.arange(rows, device=self.device)
        self.use_graph = cuda_graph and self.device.type == "cuda"
        self.graph: torch.cuda.CUDAGraph | None = None
        self.graph_cache_ptr = 0
        self.graph_logits: torch.Tensor | None = None

    def step(self, tokens: torch.Tensor, positions: torch.Tensor, live: torch.Tensor) -> torch.Tensor:
        cache = self.cache
        span = int(cache.lengths.max()) + 1
        cache.ensure(span)
        host = torch.stack([tokens, positions, cache.lengths])
        self.inputs.copy_(host, non_blocking=self.device.type == "cuda")
        cache.lengths[live] += 1
        if not self.use_graph:
            return self._forward(span)
        if self.graph is None or self.graph_cache_ptr != cache.k[0].data_ptr():
            self._capture()
        self.graph.replay()
        return self.graph_logits

    def _capture(self) -> None:
        """Warm up on a side stream (the warm-up's cache writes are the ones this step makes anyway), then capture."""
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            self._forward(self.cache.capacity)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.graph_logits = self._forward(self.cache.capacity)
        self.graph_cache_ptr = self.cache.k[0].data_ptr()

    def _forward(self, span: int) -> torch.Tensor:
        """The step on the static input buffer → logits [N, V]; no host syncs, so it can be captured.

        Attention reads cache slots [0, span): the whole capacity in a graph, the longest row's length otherwise.
        """
        tokens, positions, lengths = self.inputs
        n, d = tokens.shape[0], self.head_dim
        hq, hkv = self.num_heads, self.num_kv_heads
        x = F.embedding(tokens, self.embed_weight)
        cos, sin = mrope_cos_sin(positions.expand(3, -1), self.freqs, self.mrope_section, x.dtype)  # [N, D]
        mask = (torch.arange(span, device=self.device) <= lengths.unsqueeze(1)).view(n, 1, 1, span)
        for w, k_cache, v_cache in zip(self.layers, self.cache.k, self.cache.v):
            qkv = F.linear(w.input_norm.forward(x), *w.qkv).view(n, hq + 2 * hkv, d)
            qk, v = qkv[:, : hq + hkv], qkv[:, hq + hkv :]
            qk = apply_rope(qk, cos, sin)
            q, k = qk[:, :hq], qk[:, hq:]
            k_cache[self.row_index, :, lengths] = k.to(k_cache.dtype)
            v_cache[self.row_index, :, lengths] = v.to(v_cache.dtype)
            keys, values = k_cache[:, :, :span], v_cache[:, :, :span]
            out = F.scaled_dot_product_attention(q.reshape(n, hkv, hq // hkv, d), keys, values, attn_mask=mask)
            x = x + F.linear(out.reshape(n, hq * d), *w.o_proj)
            h = w.post_norm.forward(x)
            x = x + F.linear(F.silu(F.linear(h, *w.gate_proj)) * F.linear(h, *w.up_proj), *w.down_proj)
        return F.linear(self.decoder_norm.forward(x), self.lm_head_weight)
