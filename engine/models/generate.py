"""Batched sampling with a KV cache, and interleaved images spliced into a sample mid-generation.

Each prompt is prefilled once (packed, varlen attention) and its cache rows copied to its G samples. Every step
then appends one chunk per live sample: normally the token just sampled, but for a sample whose newest token
completed ``focus_trigger`` (it may run past it: a BPE token such as ``><``) the chunk is that token followed by
``<|vision_start|> <|image_pad|>*n <|vision_end|>`` for each image the focus hook returned. The images of all
such samples are preprocessed and encoded by the vision tower in one batch; the pads' embeddings are replaced by
the vision features, the chunk's M-RoPE ids continue the sample's own position counter, and its K/V land in the
sample's cache row. The result is exactly the sequence a full forward over the spliced tokens would see (the
tests prove it logit for logit).

The model samples in eval mode (no dropout, LoRA's included) whatever mode it was in; its modules' modes are
restored afterwards.

One iteration per token, each part its own object: :class:`_Sampler` (``sample_tokens`` with the call's
settings, on the device) → :class:`_HostBookkeeping` (on the host: :class:`_StopRules` for stop strings, eos,
length and focus triggers, then :class:`_FocusSplicer`, the hook and one vision-tower batch for all triggering
samples) → a decoder of ``engine.models.decode_steps`` (step dispatch), which returns the next logits of the live
samples in sample order.

Decoders (``decode``):

- ``"graph"`` (default) and ``"static"``: :class:`~engine.models.static_decode.StaticDecodeStep`, a CUDA graph on
  CUDA with ``"graph"``, the same static step eagerly otherwise. Finished samples leave the decode batch: the live
  rows are kept in the smallest *bucket* of cache rows ``0 .. b-1`` that holds them, b one of the powers of two
  below the batch and the batch itself (``decode_steps.bucket_sizes``); when enough rows have finished, the live
  ones are moved down (their cache rows copied, order kept) and the step runs on the smaller bucket, whose graph
  is captured once. A step that splices views feeds the splicing rows' chunks in one batched
  :meth:`~engine.models.static_decode.StaticDecodeStep.extend` call (no module hooks) and the other live rows
  through the bucket's static step, so no step takes the module path. The host reads each step's tokens before
  it launches the next (lockstep).
- ``"graph_async"``: the same static step (graph replay on CUDA, eager elsewhere), one step ahead of the host.
  The tokens of step k stay on the device and feed step k+1, which is launched at once; meanwhile they travel to
  the host through pinned memory (on CUDA) without blocking, and the host's bookkeeping of step k (stop strings,
  triggers, finished rows) runs while the device computes step k+1. What the host then learns is applied to the
  launched step: finished rows' results are dropped, splicing rows are fed their chunks by ``extend`` (a step
  that splices views waits for the hook, as it must), and the live rows' lengths and positions advance. The tokens
  and log-probs are the lockstep path's for the same seed: the sampler draws exactly the same rows. Finished rows
  leave the bucket one step later than in lockstep, and a batch whose rows all stop early launches one step whose
  results nobody reads.
- ``"eager"``: every step through the model's modules on the live rows (for debugging and as the reference).

A :class:`DecodeEngine` carries the static step (built once, re-bound to the current weights on every call) and the
KV cache (allocated once to the capacity the call needs: prompt + ``max_new_tokens`` + ``splice_capacity``) from
one call to the next; without one, each call builds its own.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .decode_steps import (
    AsyncStaticDecoder,
    EagerDecoder,
    SampleState,
    Spliced,
    SplicedViews,
    StaticDecoder,
    copy_rows,
)
from .decoder import KVCache
from .model import VLModel
from .processor import Processor
from .rope import mrope_position_ids
from .static_decode import StaticDecodeStep

DECODE_MODES = ("graph", "static", "eager", "graph_async")


@dataclass
class FocusRequest:
    """A sample whose newest token completed the focus trigger."""

    prompt_index: int
    sample_index: int
    completion_text: str


@dataclass
class Rollout:
    """One generated sample.

    input_ids int64 [T]: prompt + sampled tokens + spliced vision tokens, in order. completion_mask bool [T]: True
    only for sampled tokens. logprobs float32 [T]: log-probability of each sampled token under softmax(logits /
    temperature) (before top-p), 0 elsewhere. pixel_values [P, patch_dim] / image_grid_thw int64 [n, 3]: every
    image in the sequence (prompt's, then spliced), or None. text: decoded completion without special or spliced
    tokens. finished: ended with an eos token or a stop string (False: hit max_new_tokens).
    """

    prompt_index: int
    sample_index: int
    input_ids: torch.Tensor
    completion_mask: torch.Tensor
    logprobs: torch.Tensor
    pixel_values: torch.Tensor | None
    image_grid_thw: torch.Tensor | None
    text: str
    finished: bool
    num_focus_steps: int


FocusHook = Callable[[list[FocusRequest]], Sequence[Sequence[torch.Tensor] | None]]


def sample_tokens(
    logits: torch.Tensor,
    temperature: float,
    top_p: float,
    generator: torch.Generator | None,
    banned: Sequence[int] | torch.Tensor = (),
) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [n, V] → (tokens int64 [n], log-prob of each under softmax(logits / temperature), fp32 [n]).

    temperature <= 0 is greedy (log-probs then use temperature 1). top_p < 1 samples from the smallest set of
    tokens whose probability reaches top_p. ``banned`` ids (input-only placeholders such as the image pad; a tensor
    on the logits' device saves a copy per call) are never sampled; the reported log-probs are those of the
    unmodified distribution, i.e. of the model itself.
    """
    logits = logits.float()
    scaled = logits / temperature if temperature > 0 else logits
    logp = F.log_softmax(scaled, dim=-1)
    allowed = logp
    if len(banned):
        banned = torch.as_tensor(banned, device=logits.device)
        allowed = logp.index_fill(-1, banned, float("-inf"))
    if temperature <= 0:
        tokens = allowed.argmax(-1)
    else:
        probs = allowed.softmax(-1)
        if top_p < 1.0:
            sorted_p, order = probs.sort(dim=-1, descending=True)
            drop = (sorted_p.cumsum(-1) - sorted_p) >= top_p  # keep the first token always
            sorted_p = sorted_p.masked_fill(drop, 0.0)
            probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
        tokens = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    return tokens, logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


@dataclass
class _Sampler:
    """``sample_tokens`` with one call's settings: logits [n, V] → (tokens int64 [n], log-probs fp32 [n]) on the
    logits' device. The function is looked up at every call, so a test or benchmark can stand in for it."""

    temperature: float
    top_p: float
    generator: torch.Generator | None
    banned: torch.Tensor

    def __call__(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return sample_tokens(logits, self.temperature, self.top_p, self.generator, self.banned)


class _TextStream:
    """Incremental byte-level decoding: tokens are held back while they end inside a UTF-8 character."""

    def __init__(self, processor: Processor) -> None:
        self.tokenizer = processor.tokenizer

    def push(self, s: SampleState, token: int) -> str:
        s.pending.append(token)
        piece = self.tokenizer.decode(s.pending, skip_special_tokens=True)
        if piece.endswith("\ufffd") and len(s.pending) < 4:
            return ""
        s.pending.clear()
        s.text += piece
        return piece


@dataclass
class _StopRules:
    """Stop detection and focus triggers: what a sampled token does to its sample."""

    stream: _TextStream
    eos: set[int]
    stop_strings: Sequence[str]
    max_new_tokens: int
    focus: bool
    focus_trigger: str
    max_focus_steps: int

    def observe(self, s: SampleState, token: int, logp: float) -> FocusRequest | None:
        """Append ``token`` to ``s``; mark it done (eos, stop string, length); a request if it completed the
        trigger."""
        s.ids.append(token)
        s.mask.append(True)
        s.logprobs.append(logp)
        s.new_tokens += 1
        piece = "" if token in self.eos else self.stream.push(s, token)
        if token in self.eos or any(stop in s.text[-(len(stop) + len(piece)) :] for stop in self.stop_strings if piece):
            s.finished = s.done = True
        elif s.new_tokens >= self.max_new_tokens:
            s.done = True
        elif (
            self.focus
            and s.focus_steps < self.max_focus_steps
            and piece
            and self.focus_trigger in s.text[-(len(self.focus_trigger) + len(piece) - 1) :]  # a token may run past it
        ):
            upto = s.text.rindex(self.focus_trigger) + len(self.focus_trigger)  # the hook reads up to the trigger
            return FocusRequest(s.prompt_index, s.sample_index, s.text[:upto])
        return None


class _FocusSplicer:
    """The focus hook, called once for all triggering samples of a step, and one vision batch for every image it
    returned → the views each sample splices in (recorded in the sample: its images, grids and focus steps)."""

    def __init__(self, model: VLModel, processor: Processor, hook: FocusHook, samples: list[SampleState]) -> None:
        self.model, self.processor, self.hook, self.samples = model, processor, hook, samples

    def __call__(self, requests: list[tuple[int, FocusRequest]]) -> Spliced:
        results = self.hook([req for _, req in requests])
        if len(results) != len(requests):
            raise ValueError(f"focus_hook returned {len(results)} results for {len(requests)} requests")
        processor, tok = self.processor, self.processor.tokenizer
        per_sample, all_pv, all_grid = [], [], []
        for (i, _), images in zip(requests, results):
            if not images:
                continue
            pv, grid = processor.preprocess_images(list(images))
            per_sample.append((i, grid))
            all_pv.append(pv)
            all_grid.append(grid)
            s = self.samples[i]
            s.pixel_values.append(pv)
            s.grids.append(grid)
            s.focus_steps += 1
        if not per_sample:
            return {}
        feats = self.model.visual(torch.cat(all_pv).to(self.model.lm_head_weight.device), torch.cat(all_grid))
        out, offset = {}, 0
        for i, grid in per_sample:
            ids = []
            for n in processor.image_tokens(grid):
                ids += [tok.vision_start_id] + [tok.image_pad_id] * n + [tok.vision_end_id]
            n_pads = sum(processor.image_tokens(grid))
            out[i] = SplicedViews(ids, grid, feats[offset : offset + n_pads])
            offset += n_pads
        return out


@dataclass
class _HostBookkeeping:
    """The host's part of a step: record each live sample's sampled token, apply the stop rules, splice the views
    of the samples that triggered, and say which samples are still live."""

    samples: list[SampleState]
    rules: _StopRules
    splicer: _FocusSplicer | None

    def record(self, live: list[int], tokens: list[int], logps: list[float]) -> tuple[list[int], Spliced]:
        """``tokens`` / ``logps``: one per sample of ``live`` (ascending) → (the samples still live, their views)."""
        requests = []
        for i, token, logp in zip(live, tokens, logps):
            request = self.rules.observe(self.samples[i], token, logp)
            if request is not None:
                requests.append((i, request))
        spliced = self.splicer(requests) if requests else {}
        return [i for i in live if not self.samples[i].done], spliced


class _PendingTokens:
    """One step's sampled tokens and log-probs on their way to the host: on CUDA copied into pinned memory without
    blocking (:meth:`put`) and read once the copy has landed (:meth:`take`); elsewhere read as they are."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.tokens = self.logps = torch.empty(0)
        self.copied: torch.cuda.Event | None = None

    def put(self, tokens: torch.Tensor, logps: torch.Tensor) -> None:
        if not self.cuda:
            self.tokens, self.logps = tokens, logps
            return
        self.tokens = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True).copy_(tokens, non_blocking=True)
        self.logps = torch.empty(logps.shape, dtype=logps.dtype, pin_memory=True).copy_(logps, non_blocking=True)
        self.copied = torch.cuda.Event()
        self.copied.record()

    def take(self) -> tuple[list[int], list[float]]:
        if self.copied is not None:
            self.copied.synchronize()
        return self.tokens.tolist(), self.logps.tolist()


def _run_lockstep(
    sampler: _Sampler,
    book: _HostBookkeeping,
    decoder: EagerDecoder | StaticDecoder,
    logits: torch.Tensor,
    live: list[int],
    stats: dict[str, int],
) -> None:
    """``decode="graph"/"static"/"eager"``: sample, read the tokens on the host, then run the next step."""
    while True:
        tokens, logps = sampler(logits)
        live, spliced = book.record(live, tokens.tolist(), logps.tolist())
        if not live:
            return
        stats["steps"] += 1
        stats["live_row_steps"] += len(live)
        logits = decoder(live, spliced)


def _run_one_step_behind(
    sampler: _Sampler,
    book: _HostBookkeeping,
    decoder: AsyncStaticDecoder,
    logits: torch.Tensor,
    live: list[int],
    max_new_tokens: int,
    stats: dict[str, int],
) -> None:
    """``decode="graph_async"``: sample step k, launch step k+1 from its tokens on the device, then record step k on
    the host (while the device computes) and apply what it found to the launched step."""
    pending = _PendingTokens(decoder.device)
    for k in range(max_new_tokens):
        tokens, logps = sampler(logits)
        pending.put(tokens, logps)
        if k + 1 < max_new_tokens:  # after the last token every sample is done: nothing to launch
            decoder.launch(live, tokens)
        live, spliced = book.record(live, *pending.take())
        if not live:
            return
        stats["steps"] += 1
        stats["live_row_steps"] += len(live)
        logits = decoder.land(live, spliced)


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """``model.eval()`` for the duration (no dropout: the sampling policy is the policy), then every module's own
    ``training`` flag back as it was."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, training in modes:
            m.training = training


class DecodeEngine:
    """What a run keeps from one ``generate`` call to the next (pass the same engine to every call).

    - the :class:`StaticDecodeStep`, built on the first call and re-bound to the model's current parameters on
      every later one (``num_builds`` counts constructions): its fused q/k/v buffers are refilled in place and each
      bucket's CUDA graph is replayed again as long as nothing it read moved;
    - the KV cache, allocated on the first call to the rows and capacity it needs and reused while later calls
      fit (a bigger call reallocates once, to the larger of both). ``keep_cache=False`` frees it at the end of
      every call, for the memory of whatever runs in between (the policy update); graphs then replay again only
      if the new cache lands at the same addresses.

    ``stats``: figures of the last call — ``steps`` (decode iterations), ``row_steps`` (cache rows the static step
    computed, summed over steps, ``graph_async``'s last launch included even when nobody reads it; eager: live
    rows), ``live_row_steps`` (live rows, summed), ``compactions``, ``splice_steps``, ``captures`` (CUDA graphs
    captured).
    """

    def __init__(self, keep_cache: bool = True) -> None:
        self.keep_cache = keep_cache
        self.step: StaticDecodeStep | None = None
        self.cache: KVCache | None = None
        self.num_builds = 0
        self.stats: dict[str, int] = {}

    def static_step(self, model: nn.Module, cuda_graph: bool) -> StaticDecodeStep:
        if self.step is None or self.step.model is not model:
            self.step = StaticDecodeStep(model, cuda_graph=cuda_graph)
            self.num_builds += 1
        else:
            self.step.cuda_graph = cuda_graph
            self.step.bind(model)
        return self.step

    def kv_cache(self, model: nn.Module, rows: int, capacity: int) -> KVCache:
        """An empty cache of at least ``rows`` rows and ``capacity`` slots (this engine's, if it fits)."""
        t = model.config.text
        weight = model.lm_head_weight
        c = self.cache
        fits = (
            c is not None
            and len(c.k) == t.num_hidden_layers
            and c.k[0].shape[0] >= rows
            and c.capacity >= capacity
            and (c.k[0].dtype, c.k[0].device) == (weight.dtype, weight.device)
        )
        if not fits:
            if c is not None and (c.k[0].dtype, c.k[0].device) == (weight.dtype, weight.device):
                rows, capacity = max(rows, c.k[0].shape[0]), max(capacity, c.capacity)
            self.cache = c = None  # free the old one first
            c = KVCache(
                t.num_hidden_layers, rows, t.num_key_value_heads, t.head_dim, capacity, weight.dtype, weight.device
            )
        c.lengths.zero_()
        self.cache = c
        return c

    def release(self) -> None:
        """Free the KV cache (the static step and its buffers stay)."""
        self.cache = None
        if self.step is not None:
            self.step.cache = None


@torch.no_grad()
def generate(
    model: VLModel,
    processor: Processor,
    prompts: list[dict],
    num_samples: int,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    stop_strings: Sequence[str] = (),
    focus_hook: FocusHook | None = None,
    focus_trigger: str = "</area>",
    max_focus_steps: int = 0,
    generator: torch.Generator | None = None,
    decode: str = "graph",
    engine: DecodeEngine | None = None,
    splice_capacity: int = 0,
) -> list[Rollout]:
    """Sample ``num_samples`` completions per prompt (dicts from ``Processor.apply_chat_template``).

    Rollouts come back prompt-major: prompt 0's samples 0..G-1, then prompt 1's, ... See the module docstring for
    the focus hook; it is called once per step with all triggering samples and must return, per request, a list
    of images (uint8 [H,W,3] or float [3,H,W] in [0,1]) or None. ``decode``: one of ``DECODE_MODES``, see the
    module docstring. ``engine``: the :class:`DecodeEngine` that keeps the static step and the KV cache between
    calls (None: a fresh one). ``splice_capacity``: cache slots per row reserved for spliced view tokens (more
    makes the cache grow).
    """
    if num_samples < 1 or max_new_tokens < 1:
        raise ValueError("generate: num_samples and max_new_tokens must be >= 1")
    if decode not in DECODE_MODES:
        raise ValueError(f"generate: decode must be one of {DECODE_MODES}, got {decode!r}")
    cfg = model.config
    device = model.lm_head_weight.device
    tok = processor.tokenizer
    if (tok.image_pad_id, tok.vision_start_id) != (cfg.image_token_id, cfg.vision_start_token_id):
        raise ValueError("generate: the tokenizer's image/vision-start ids differ from the model config's")
    banned = torch.tensor(
        [cfg.image_token_id, cfg.video_token_id, cfg.vision_start_token_id, cfg.vision_end_token_id], device=device
    )
    sampler = _Sampler(temperature, top_p, generator, banned)
    rules = _StopRules(
        _TextStream(processor),
        set(tok.eos_token_ids),
        stop_strings,
        max_new_tokens,
        focus_hook is not None,
        focus_trigger,
        max_focus_steps,
    )
    engine = engine if engine is not None else DecodeEngine(keep_cache=False)
    stats = engine.stats = dict.fromkeys(
        ("steps", "row_steps", "live_row_steps", "compactions", "splice_steps", "captures"), 0
    )
    try:
        with eval_mode(model):
            cache, logits, samples = _prefill(model, prompts, num_samples, max_new_tokens + splice_capacity, engine)
            splicer = _FocusSplicer(model, processor, focus_hook, samples) if focus_hook is not None else None
            book = _HostBookkeeping(samples, rules, splicer)
            live = list(range(len(samples)))  # sample indices, ascending; ``logits`` has one row per live sample
            if decode == "eager":
                _run_lockstep(sampler, book, EagerDecoder(model, cache, samples, stats), logits, live, stats)
            else:
                step = engine.static_step(model, cuda_graph=decode != "static")
                if decode == "graph_async":
                    decoder = AsyncStaticDecoder(step, cache, samples, stats)
                    _run_one_step_behind(sampler, book, decoder, logits, live, max_new_tokens, stats)
                else:
                    _run_lockstep(sampler, book, StaticDecoder(step, cache, samples, stats), logits, live, stats)
    finally:
        if not engine.keep_cache:
            engine.release()
    return [_to_rollout(s, tok) for s in samples]


def _to_rollout(s: SampleState, tok) -> Rollout:
    return Rollout(
        prompt_index=s.prompt_index,
        sample_index=s.sample_index,
        input_ids=torch.tensor(s.ids, dtype=torch.long),
        completion_mask=torch.tensor(s.mask, dtype=torch.bool),
        logprobs=torch.tensor(s.logprobs, dtype=torch.float32),
        pixel_values=torch.cat(s.pixel_values) if s.pixel_values else None,
        image_grid_thw=torch.cat(s.grids) if s.grids else None,
        text=s.text + (tok.decode(s.pending, skip_special_tokens=True) if s.pending else ""),
        finished=s.finished,
        num_focus_steps=s.focus_steps,
    )


def _prefill(
    model: VLModel, prompts: list[dict], g: int, extra: int, engine: DecodeEngine
) -> tuple[KVCache, torch.Tensor, list[SampleState]]:
    """Run every prompt once (packed), copy its cache row to its g sample rows; logits [P*g, V] of the next token.

    The cache holds the longest prompt + ``extra`` + 1 slots per row (``extra``: new tokens and spliced views)."""
    cfg = model.config
    device = model.lm_head_weight.device
    ids_list, pos_list, pv_list, grid_list = [], [], [], []
    for i, p in enumerate(prompts):
        ids = p["input_ids"].to("cpu", torch.long)
        if ids.dim() != 1 or ids.numel() == 0:
            raise ValueError(f"generate: prompt {i} input_ids must be a non-empty 1-D tensor")
        grid = p.get("image_grid_thw")
        grid = None if grid is None else grid.to("cpu", torch.long)
        ids_list.append(ids)
        pos_list.append(mrope_position_ids(ids, grid, cfg))
        if p.get("pixel_values") is not None:
            pv_list.append(p["pixel_values"])
            grid_list.append(grid)
    lens = torch.tensor([len(x) for x in ids_list])
    cache = engine.kv_cache(model, len(prompts) * g, int(lens.max()) + extra + 1)
    first_rows = torch.arange(len(prompts)) * g
    pv = torch.cat(pv_list).to(device) if pv_list else None
    x = model.embed(torch.cat(ids_list).to(device), pv, torch.cat(grid_list) if grid_list else None)
    view = cache.plan(first_rows, lens, prefill=True)
    hidden = model.run_layers(x, torch.cat(pos_list, dim=1), None, cache, view)
    last = (torch.cumsum(lens, 0) - 1).to(device)
    logits = F.linear(hidden[last], model.lm_head_weight).repeat_interleave(g, dim=0)
    if g > 1:
        dst = (first_rows.unsqueeze(1) + torch.arange(1, g)).flatten()
        copy_rows(cache, first_rows.repeat_interleave(g - 1), dst, int(lens.max()))
    samples = []
    for i, p in enumerate(prompts):
        has_images = p.get("pixel_values") is not None
        n = len(ids_list[i])
        for j in range(g):
            samples.append(
                SampleState(
                    prompt_index=i,
                    sample_index=j,
                    ids=ids_list[i].tolist(),
                    mask=[False] * n,
                    logprobs=[0.0] * n,
                    pixel_values=[p["pixel_values"]] if has_images else [],
                    grids=[p["image_grid_thw"].to("cpu", torch.long)] if has_images else [],
                    next_pos=int(pos_list[i].max()) + 1,
                )
            )
    return cache, logits, samples
