"""The decode step with static shapes: one token per cache row, fused q/k/v, LoRA as a low-rank product, no module
hooks, a CUDA graph per batch bucket; and the same weights for the multi-token steps that splice views in.

The general cached step (``decode_steps.EagerDecoder``) goes through the model's modules: per layer three q/k/v
linears, two RoPE calls, the FSDP2 hooks of every block, Python per op, and a ``CacheView`` built on the CPU. A
plain decode step is then bound by launch and dispatch cost, not by the GPU (the profile is in
benchmarks/results/2026-11-26b-NVIDIA_H200/README.md, section 1).

:class:`StaticDecodeStep` runs the common step, where every row of a *bucket* (cache rows ``0 .. b-1``) appends
exactly the token it sampled, all at once (rows that are done or were fed by a splice compute a throw-away token):

- It is built once per run (``engine.models.generate.DecodeEngine``) and re-bound to the model at the start of every
  ``generate`` call (:meth:`bind`): it *references* the model's current parameters (under FSDP2, the gathered ones),
  so optimiser updates are seen. The only copies are the fused q/k/v buffers — each layer's q/k/v weights and
  biases concatenated, and, for LoRA, the three ``A`` stacked and the three ``B`` placed block-diagonally with the
  scaling folded in — refilled in place on every bind (about a sixth of the decoder's parameters, plus the
  adapters). No adapted weight is ever merged: a LoRA layer computes ``x Wᵀ + b + s·(x Aᵀ) Bᵀ``, so the fused
  q/k/v projection is ``x W_qkvᵀ + b_qkv + (x A_qkvᵀ) (s·B_qkv)ᵀ``. No adapter dropout (rollouts sample the
  policy in eval mode). The norms call the modules' ``forward`` directly: their numerics are the model's, and
  module hooks (FSDP2's) are bypassed.
- The new K/V go to slot ``lengths[row]``; attention reads the cache slots under the mask ``slot <= length``:
  all of them in a CUDA graph, whose shapes then depend only on (bucket, cache capacity), never on the step; up
  to the longest row otherwise.
- Query heads are grouped by their KV head, [b, Hkv, Hq/Hkv, D], and attend as the "query length" of one SDPA
  call, so GQA needs no repeated K/V.
- On CUDA each bucket's step is captured once as a CUDA graph and replayed: one host→device copy of (tokens,
  positions, lengths) and one graph launch per token (or, with the tokens already on the device, a device copy
  of the tokens and a pinned, non-blocking copy of positions and lengths: :meth:`run`). A bucket's graph is
  captured again only if what it read moved: the cache was reallocated, or a bind found a parameter at another
  address (FSDP2 may re-allocate the gathered parameters on every unshard; then every rollout captures its
  buckets anew, once each).

:meth:`extend` runs a multi-token step on chosen rows (the chunks that splice views in: the last sampled token,
then ``<|vision_start|> <|image_pad|>*n <|vision_end|>`` per view, with M-RoPE positions) with the same weights
and the module path's attention (``Attention._cached`` on a ``CacheView``), but without the modules' hooks.

Decode tokens are text, whose three M-RoPE ids are equal; the step builds its tables with ``mrope_cos_sin`` and
rotates with ``apply_rope``, as the module path does on the CPU. Use it with the parameters gathered
(``engine.distributed.unsharded``), as rollouts are.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .decoder import CacheView, KVCache
from .rope import apply_rope, inv_freq, mrope_cos_sin


@dataclass
class _Linear:
    """A projection as the step computes it: x Wᵀ + b, plus (x Aᵀ) Bᵀ · scaling for an enabled LoRA adapter.

    weight / bias / lora_A / lora_B are the module's own parameters (references, never copies)."""

    weight: torch.Tensor
    bias: torch.Tensor | None = None
    lora_A: torch.Tensor | None = None
    lora_B: torch.Tensor | None = None
    scaling: float = 1.0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
        if self.lora_A is None:
            return y
        a, b = self.lora_A.to(x.dtype), self.lora_B.to(x.dtype)  # a no-op when the dtypes agree
        return y + F.linear(F.linear(x, a), b) * self.scaling

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.weight, self.bias, self.lora_A, self.lora_B) if t is not None]


def _as_linear(linear: nn.Linear) -> _Linear:
    """Reference a Linear's parameters; a LoRA layer's enabled adapter as its low-rank factors."""
    weight = linear.weight.detach()
    bias = None if linear.bias is None else linear.bias.detach()
    if getattr(linear, "lora_enabled", False) and hasattr(linear, "lora_A"):
        return _Linear(weight, bias, linear.lora_A.detach(), linear.lora_B.detach(), float(linear.scaling))
    return _Linear(weight, bias)


class _FusedQKV:
    """q/k/v as one projection: persistent buffers W [(Hq+2Hkv)·D, H], b, and for the adapted ones A [Σr, H] and
    the block-diagonal s·B [(Hq+2Hkv)·D, Σr]; :meth:`refill` copies the current parameters in, in place."""

    def __init__(self, parts: list[nn.Linear], dtype: torch.dtype) -> None:
        refs = [_as_linear(p) for p in parts]
        self.signature = _qkv_signature(refs)
        w0 = refs[0].weight
        rows = sum(r.weight.shape[0] for r in refs)
        self.weight = torch.empty(rows, w0.shape[1], dtype=w0.dtype, device=w0.device)
        self.bias = torch.empty(rows, dtype=refs[0].bias.dtype, device=w0.device)  # Qwen2's q/k/v carry biases
        rank = sum(r.lora_A.shape[0] for r in refs if r.lora_A is not None)
        self.lora_A = torch.empty(rank, w0.shape[1], dtype=dtype, device=w0.device) if rank else None
        self.lora_B = torch.zeros(rows, rank, dtype=dtype, device=w0.device) if rank else None
        self.refill(parts)

    def refill(self, parts: list[nn.Linear]) -> None:
        refs = [_as_linear(p) for p in parts]
        torch.cat([r.weight for r in refs], out=self.weight)
        torch.cat([r.bias for r in refs], out=self.bias)
        if self.lora_A is None:
            return
        row = col = 0
        for r in refs:
            out = r.weight.shape[0]
            if r.lora_A is not None:
                k = r.lora_A.shape[0]
                self.lora_A[col : col + k].copy_(r.lora_A)
                self.lora_B[row : row + out, col : col + k].copy_(r.lora_B * r.scaling)
                col += k
            row += out

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
        if self.lora_A is None:
            return y
        return y + F.linear(F.linear(x, self.lora_A.to(x.dtype)), self.lora_B.to(x.dtype))

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.weight, self.bias, self.lora_A, self.lora_B) if t is not None]


def _qkv_signature(refs: list[_Linear]) -> tuple:
    """What fixes the fused buffers' shapes and dtypes: each part's weight shape/dtype and adapter rank."""
    return tuple((tuple(r.weight.shape), r.weight.dtype, None if r.lora_A is None else r.lora_A.shape[0]) for r in refs)


@dataclass
class _LayerWeights:
    """One decoder layer as the static step runs it: q/k/v fused, the rest referenced."""

    qkv: _FusedQKV
    o_proj: _Linear
    gate_proj: _Linear
    up_proj: _Linear
    down_proj: _Linear
    input_norm: nn.Module
    post_norm: nn.Module
    attn: nn.Module  # for ``_cached`` (the module path's cached attention) in multi-token steps

    def tensors(self) -> list[torch.Tensor]:
        out = self.qkv.tensors()
        for lin in (self.o_proj, self.gate_proj, self.up_proj, self.down_proj):
            out += lin.tensors()
        return out + [self.input_norm.weight, self.post_norm.weight]


@dataclass
class _Graph:
    """One bucket's captured step: its static inputs [3, b] (tokens, positions, lengths), output and what it read."""

    inputs: torch.Tensor
    graph: torch.cuda.CUDAGraph | None = None
    logits: torch.Tensor | None = None
    key: tuple = ()


class StaticDecodeStep:
    """Next-token logits for cache rows ``0 .. b-1`` after appending one token per row.

    ``step(tokens, positions, live)`` takes int64 CPU tensors: tokens / positions [b] (the token each row of the
    bucket appends and its M-RoPE position id; b <= the cache's rows) and the ``live`` row indices (< b). Every row
    of the bucket writes K/V at its current length, but only live rows advance ``cache.lengths``: a row that is done
    (or was just fed by :meth:`extend`) keeps overwriting the slot after its sequence, which its next append
    overwrites again. Returns logits [b, V] in the model's dtype (the non-live rows' are meaningless). On CUDA
    (``cuda_graph``) the returned tensor is the bucket graph's output buffer: read it before its next replay.
    :meth:`run` is the same step with tokens that may already be on the device and no length advanced (the
    caller advances the rows it learns are live later: ``decode="graph_async"``).

    Build it once and call :meth:`bind` (the model, after its parameters changed or moved) and :meth:`attach`
    (a cache) before the steps of each ``generate`` call.
    """

    def __init__(self, model: nn.Module, cache: KVCache | None = None, cuda_graph: bool = True) -> None:
        cfg = model.config.text
        self.num_heads, self.num_kv_heads, self.head_dim = (
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.head_dim,
        )
        self.rope_theta, self.mrope_section = cfg.rope_theta, cfg.mrope_section
        self.cuda_graph = cuda_graph
        self.layers: list[_LayerWeights] = []
        self.graphs: dict[int, _Graph] = {}
        self.num_captures = 0
        self.cache: KVCache | None = None
        self.bind(model)
        if cache is not None:
            self.attach(cache)

    # ------------------------------------------------------------------------------------------------------
    # weights and cache

    def bind(self, model: nn.Module) -> None:
        """Reference ``model``'s current parameters and refill the fused q/k/v buffers in place (no other copy).

        Buffers are reallocated only if a layer's adapter structure changed (an adapter switched on or off); any
        captured graph that read a tensor now at another address is dropped (recaptured on its next step)."""
        self.model = model
        self.decoder_norm = model.model.norm
        self.embed_weight = model.model.embed_tokens.weight.detach()
        self.lm_head_weight = model.lm_head_weight.detach()
        self.device = self.lm_head_weight.device
        self.dtype = self.lm_head_weight.dtype
        if getattr(self, "freqs", None) is None or self.freqs.device != self.device:  # kept: graphs read it
            self.freqs = inv_freq(self.head_dim, self.rope_theta, self.device)
        layers = []
        for i, layer in enumerate(model.model.layers):
            attn, mlp = layer.self_attn, layer.mlp
            parts = [attn.q_proj, attn.k_proj, attn.v_proj]
            old = self.layers[i].qkv if i < len(self.layers) else None
            if old is not None and old.signature == _qkv_signature([_as_linear(p) for p in parts]):
                old.refill(parts)
                qkv = old
            else:
                qkv = _FusedQKV(parts, self.dtype)
            layers.append(
                _LayerWeights(
                    qkv,
                    _as_linear(attn.o_proj),
                    _as_linear(mlp.gate_proj),
                    _as_linear(mlp.up_proj),
                    _as_linear(mlp.down_proj),
                    layer.input_layernorm,
                    layer.post_attention_layernorm,
                    attn,
                )
            )
        self.layers = layers
        self.use_graph = self.cuda_graph and self.device.type == "cuda"
        self._weights_key = self._addresses()
        self._drop_stale_graphs()

    def attach(self, cache: KVCache) -> None:
        """Decode into ``cache`` (rows 0 .. b-1 for a bucket of b rows)."""
        if cache.k[0].device != self.device:
            raise ValueError(f"StaticDecodeStep: cache on {cache.k[0].device}, weights on {self.device}")
        self.cache = cache
        self._drop_stale_graphs()

    def _addresses(self) -> tuple[int, ...]:
        tensors = [self.embed_weight, self.lm_head_weight, self.decoder_norm.weight, self.freqs]
        for w in self.layers:
            tensors += w.tensors()
        return tuple(t.data_ptr() for t in tensors)

    def _graph_key(self) -> tuple:
        cache = self.cache
        return (self._weights_key, tuple(t.data_ptr() for t in cache.k + cache.v), tuple(cache.k[0].shape))

    def _drop_stale_graphs(self) -> None:
        if self.cache is None:
            return
        key = self._graph_key()
        self.graphs = {b: g for b, g in self.graphs.items() if g.graph is None or g.key == key}

    # ------------------------------------------------------------------------------------------------------
    # one token per row

    def step(self, tokens: torch.Tensor, positions: torch.Tensor, live: torch.Tensor) -> torch.Tensor:
        """:meth:`run`, then the ``live`` rows' lengths advance."""
        logits = self.run(tokens, positions)
        self.cache.lengths[live] += 1
        return logits

    def run(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """The step without advancing any length: every row of the bucket writes its K/V at its current length.

        tokens int64 [b] on the CPU, or on the model's device (the sampler's output, fed without a host round
        trip: then positions and lengths travel from pinned memory without blocking); positions int64 [b] CPU."""
        cache = self.cache
        b = tokens.shape[0]
        if b > cache.lengths.shape[0]:
            raise ValueError(f"StaticDecodeStep: a bucket of {b} rows on a cache of {cache.lengths.shape[0]}")
        lengths = cache.lengths[:b]
        span = int(lengths.max()) + 1
        cache.ensure(span)
        entry = self.graphs.get(b)
        if entry is None:
            entry = self.graphs[b] = _Graph(torch.zeros(3, b, dtype=torch.long, device=self.device))
        cuda = self.device.type == "cuda"
        if tokens.device.type == "cpu":
            entry.inputs.copy_(torch.stack([tokens, positions, lengths]), non_blocking=cuda)
        else:
            entry.inputs[1:].copy_(torch.stack([positions, lengths]).pin_memory(), non_blocking=True)
            entry.inputs[0].copy_(tokens)
        if not self.use_graph:
            return self._forward(entry.inputs, span)
        key = self._graph_key()
        if entry.graph is None or entry.key != key:
            self._capture(entry, key)
        entry.graph.replay()
        return entry.logits

    def _capture(self, entry: _Graph, key: tuple) -> None:
        """Warm up on a side stream (the warm-up's cache writes are the ones this step makes anyway), then capture."""
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            self._forward(entry.inputs, self.cache.capacity)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        entry.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(entry.graph):
            entry.logits = self._forward(entry.inputs, self.cache.capacity)
        entry.key = key
        self.num_captures += 1

    def _forward(self, inputs: torch.Tensor, span: int) -> torch.Tensor:
        """The step on a bucket's static input buffer → logits [b, V]; no host syncs, so it can be captured.

        Attention reads cache slots [0, span): the whole capacity in a graph, the longest row's length otherwise.
        """
        tokens, positions, lengths = inputs
        n, d = tokens.shape[0], self.head_dim
        hq, hkv = self.num_heads, self.num_kv_heads
        rows = torch.arange(n, device=self.device)
        x = F.embedding(tokens, self.embed_weight)
        cos, sin = mrope_cos_sin(positions.expand(3, -1), self.freqs, self.mrope_section, x.dtype)  # [b, D]
        mask = (torch.arange(span, device=self.device) <= lengths.unsqueeze(1)).view(n, 1, 1, span)
        for w, k_cache, v_cache in zip(self.layers, self.cache.k, self.cache.v):
            qkv = w.qkv(w.input_norm.forward(x)).view(n, hq + 2 * hkv, d)
            qk, v = qkv[:, : hq + hkv], qkv[:, hq + hkv :]
            qk = apply_rope(qk, cos, sin)
            q, k = qk[:, :hq], qk[:, hq:]
            k_cache[rows, :, lengths] = k.to(k_cache.dtype)
            v_cache[rows, :, lengths] = v.to(v_cache.dtype)
            keys, values = k_cache[:n, :, :span], v_cache[:n, :, :span]
            out = F.scaled_dot_product_attention(q.reshape(n, hkv, hq // hkv, d), keys, values, attn_mask=mask)
            x = x + w.o_proj(out.reshape(n, hq * d))
            x = x + self._mlp(w, w.post_norm.forward(x))
        return F.linear(self.decoder_norm.forward(x), self.lm_head_weight)

    @staticmethod
    def _mlp(w: _LayerWeights, h: torch.Tensor) -> torch.Tensor:
        return w.down_proj(F.silu(w.gate_proj(h)) * w.up_proj(h))

    # ------------------------------------------------------------------------------------------------------
    # several tokens on some rows (splices)

    def extend(self, x: torch.Tensor, position_ids: torch.Tensor, view: CacheView) -> torch.Tensor:
        """Packed embeddings x [T, H] of chunks appended to ``view.rows`` (planned on the attached cache), M-RoPE
        position_ids [3, T] → hidden states [T, H] after the final norm; their K/V land in the cache."""
        t, d = x.shape[0], self.head_dim
        hq, hkv = self.num_heads, self.num_kv_heads
        cos, sin = mrope_cos_sin(position_ids.to(self.device), self.freqs, self.mrope_section, x.dtype)  # [T, D]
        for w, k_cache, v_cache in zip(self.layers, self.cache.k, self.cache.v):
            qkv = w.qkv(w.input_norm.forward(x)).view(t, hq + 2 * hkv, d)
            qk = apply_rope(qkv[:, : hq + hkv], cos, sin)
            q, k, v = qk[:, :hq], qk[:, hq:], qkv[:, hq + hkv :]
            out = w.attn._cached(q, k, v, k_cache, v_cache, view)
            x = x + w.o_proj(out.reshape(t, hq * d))
            x = x + self._mlp(w, w.post_norm.forward(x))
        return self.decoder_norm.forward(x)
