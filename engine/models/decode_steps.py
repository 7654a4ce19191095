"""Step dispatch for ``engine.models.generate``: what runs the model for one decode step of the live samples.

A step appends one chunk per live sample: normally the token it just sampled, but for a sample whose newest token
completed the focus trigger, that token followed by the :class:`SplicedViews` the focus hook gave it. Three
decoders turn "these samples, these splices" into the live samples' next logits:

- :class:`EagerDecoder` (``decode="eager"``): every step through the model's modules on the live rows (cache row
  = sample), for debugging and as the reference.
- :class:`StaticDecoder` (``"graph"``, ``"static"``): :class:`~engine.models.static_decode.StaticDecodeStep` on a
  *bucket* of cache rows ``0 .. b-1``, b one of :func:`bucket_sizes`; finished samples leave the batch (the live
  rows are moved down into the smallest bucket that holds them, order kept, one graph per bucket); splicing rows
  are fed their chunks by one batched :meth:`~engine.models.static_decode.StaticDecodeStep.extend` call.
- :class:`AsyncStaticDecoder` (``"graph_async"``): the same step fed straight from the sampler's output on the
  device and launched before the host has read those tokens (:meth:`~AsyncStaticDecoder.launch`); the host's
  verdict on them (finished rows, splices) comes one step later (:meth:`~AsyncStaticDecoder.land`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .decoder import KVCache
from .model import VLModel
from .rope import mrope_position_ids
from .static_decode import StaticDecodeStep


@dataclass
class SampleState:
    """One sample as generation builds it on the host: its sequence so far (ids, the completion mask and each
    token's log-prob), its images, the next M-RoPE position id, the decoded text and the stop/focus state."""

    prompt_index: int
    sample_index: int
    ids: list[int]
    mask: list[bool]
    logprobs: list[float]
    pixel_values: list[torch.Tensor]
    grids: list[torch.Tensor]
    next_pos: int
    text: str = ""
    pending: list[int] = field(default_factory=list)
    new_tokens: int = 0
    finished: bool = False
    done: bool = False
    focus_steps: int = 0


@dataclass
class SplicedViews:
    """What one sample appends after its trigger token: the view tokens ``ids`` (``<|vision_start|>
    <|image_pad|>*n <|vision_end|>`` per image), the images' grids int64 [k, 3] and the vision tower's features
    for the pads [n_pads, H], in order."""

    ids: list[int]
    grids: torch.Tensor
    features: torch.Tensor


Spliced = dict[int, SplicedViews]  # sample index → its views at this step


def bucket_sizes(n: int) -> list[int]:
    """The decode batch sizes for ``n`` rows: the powers of two below n, then n (ascending)."""
    sizes, b = [], 1
    while b < n:
        sizes.append(b)
        b *= 2
    return sizes + [n]


def copy_rows(cache: KVCache, src: torch.Tensor, dst: torch.Tensor, span: int) -> None:
    """Cache rows ``src`` → ``dst`` (slots ``[0, span)`` of every layer, and the lengths); src and dst may overlap."""
    dev_src, dev_dst = src.to(cache.k[0].device), dst.to(cache.k[0].device)
    for t in cache.k + cache.v:
        t[dev_dst, :, :span] = t[dev_src, :, :span]
    cache.lengths[dst] = cache.lengths[src]


def _chunks(
    cfg, samples: list[SampleState], sample_ids: Sequence[int], spliced: Spliced
) -> tuple[list[int], torch.Tensor, list[int], list[torch.Tensor]]:
    """What each of ``sample_ids`` appends this step: its last sampled token, plus its spliced vision tokens.

    Returns (packed ids, M-RoPE positions [3, T], tokens per sample, vision features of the spliced pads in
    order); advances each sample's position counter and records the spliced tokens in the sample."""
    chunk_ids, chunk_pos, counts, feats = [], [], [], []
    for i in sample_ids:
        s = samples[i]
        views = spliced.get(i)
        if views is None:  # the common case: one token at the sample's next position
            chunk_ids.append(s.ids[-1])
            chunk_pos.append(torch.full((3, 1), s.next_pos))
            s.next_pos += 1
            counts.append(1)
            continue
        ids = [s.ids[-1], *views.ids]
        pos = mrope_position_ids(torch.tensor(ids), views.grids, cfg, start=s.next_pos)
        s.next_pos = int(pos.max()) + 1
        s.ids += views.ids
        s.mask += [False] * len(views.ids)
        s.logprobs += [0.0] * len(views.ids)
        chunk_ids += ids
        chunk_pos.append(pos)
        counts.append(len(ids))
        feats.append(views.features)
    return chunk_ids, torch.cat(chunk_pos, dim=1), counts, feats


def _embed_chunks(cfg, embed_weight: torch.Tensor, ids: list[int], feats: list[torch.Tensor]) -> torch.Tensor:
    ids_t = torch.tensor(ids, device=embed_weight.device)
    x = F.embedding(ids_t, embed_weight)
    if feats:
        x = x.masked_scatter((ids_t == cfg.image_token_id).unsqueeze(-1), torch.cat(feats).to(x.dtype))
    return x


def _device_index(values: list[int], device: torch.device) -> torch.Tensor:
    """int64 indices on ``device``, copied from pinned memory without blocking on CUDA."""
    return torch.tensor(values, dtype=torch.long, pin_memory=device.type == "cuda").to(device, non_blocking=True)


class EagerDecoder:
    """``decode="eager"``: every step through the modules, on the live rows only (cache row = sample)."""

    def __init__(self, model: VLModel, cache: KVCache, samples: list[SampleState], stats: dict[str, int]) -> None:
        self.model, self.cache, self.samples, self.stats = model, cache, samples, stats

    def __call__(self, live: list[int], spliced: Spliced) -> torch.Tensor:
        """Feed each live sample its chunk → next-token logits [len(live), V], in ``live`` order."""
        self.stats["row_steps"] += len(live)
        self.stats["splice_steps"] += bool(spliced)
        model, cfg = self.model, self.model.config
        ids, pos, counts, feats = _chunks(cfg, self.samples, live, spliced)
        x = _embed_chunks(cfg, model.model.embed_tokens.weight, ids, feats)
        counts_t = torch.tensor(counts)
        view = self.cache.plan(torch.tensor(live), counts_t)
        hidden = model.run_layers(x, pos, None, self.cache, view)
        return F.linear(hidden[(torch.cumsum(counts_t, 0) - 1).to(hidden.device)], model.lm_head_weight)


class StaticDecoder:
    """``decode="graph"/"static"``: the bucketed static step, splices through ``StaticDecodeStep.extend``.

    Invariant: live samples sit in cache rows ``0 .. bucket-1`` in ascending sample order (``row_of``)."""

    def __init__(
        self, step: StaticDecodeStep, cache: KVCache, samples: list[SampleState], stats: dict[str, int]
    ) -> None:
        self.cfg = step.model.config
        self.step = step
        self.step.attach(cache)
        self.device = step.device
        self.captures_before = self.step.num_captures
        self.cache, self.samples, self.stats = cache, samples, stats
        self.buckets = bucket_sizes(len(samples))
        self.bucket = len(samples)
        self.row_of = list(range(len(samples)))

    def __call__(self, live: list[int], spliced: Spliced) -> torch.Tensor:
        """Feed each live sample its chunk → next-token logits [len(live), V], in ``live`` order."""
        self._compact(live)
        splicing = [i for i in live if i in spliced]
        plain = [i for i in live if i not in spliced]
        parts = []
        if splicing:
            parts.append((splicing, self._extend(splicing, spliced)))
        if plain:
            parts.append((plain, self._decode(plain)))
        self.stats["captures"] = self.step.num_captures - self.captures_before
        if len(parts) == 1:
            return parts[0][1]
        where = {i: k for k, i in enumerate(live)}
        out = parts[0][1].new_empty(len(live), parts[0][1].shape[1])
        for ids, logits in parts:
            out[torch.tensor([where[i] for i in ids], device=out.device)] = logits
        return out

    def _compact(self, live: list[int]) -> None:
        """Move the live rows down into the smallest bucket that holds them, if that is smaller than the current."""
        target = next(b for b in self.buckets if b >= len(live))
        if target >= self.bucket:
            return
        src = torch.tensor([self.row_of[i] for i in live])
        dst = torch.arange(len(live))
        moved = src != dst
        if bool(moved.any()):
            span = int(self.cache.lengths[src[moved]].max())
            copy_rows(self.cache, src[moved], dst[moved], span)
        for row, i in enumerate(live):
            self.row_of[i] = row
        self.bucket = target
        self.stats["compactions"] += 1

    def _extend(self, splicing: list[int], spliced: Spliced) -> torch.Tensor:
        """The splicing rows' chunks in one batched multi-token step → their next-token logits."""
        ids, pos, counts, feats = _chunks(self.cfg, self.samples, splicing, spliced)
        x = _embed_chunks(self.cfg, self.step.embed_weight, ids, feats)
        counts_t = torch.tensor(counts)
        view = self.cache.plan(torch.tensor([self.row_of[i] for i in splicing]), counts_t)
        hidden = self.step.extend(x, pos, view)
        self.stats["splice_steps"] += 1
        last = (torch.cumsum(counts_t, 0) - 1).to(hidden.device)
        return F.linear(hidden[last], self.step.lm_head_weight)

    def _decode(self, plain: list[int]) -> torch.Tensor:
        """One token for every row of the bucket; the ``plain`` rows advance → their logits, in order."""
        b = self.bucket
        at_row: list[SampleState | None] = [None] * b
        for i, row in enumerate(self.row_of):
            if row < b and not self.samples[i].done:
                at_row[row] = self.samples[i]
        tokens = torch.tensor([s.ids[-1] if s is not None else 0 for s in at_row])
        positions = torch.tensor([s.next_pos if s is not None else 0 for s in at_row])
        rows = torch.tensor([self.row_of[i] for i in plain])
        for i in plain:
            self.samples[i].next_pos += 1
        logits = self.step.step(tokens, positions, rows)
        self.stats["row_steps"] += b
        if len(plain) == b:  # rows 0 .. b-1 in order
            return logits
        return logits[rows.to(logits.device)]


class AsyncStaticDecoder(StaticDecoder):
    """``decode="graph_async"``: the bucketed static step one step ahead of the host.

    :meth:`launch` feeds every row that was live before step k the token it sampled at step k, straight from the
    sampler's output on the device, and runs the bucket's step (graph replay on CUDA) before the host has read
    those tokens. :meth:`land` then takes the host's verdict on them: the rows that finished are dropped, the rows
    that splice views are fed their whole chunk by ``extend`` (which overwrites the launched token's K/V slot with
    the same token's), and only the remaining rows advance their length and position, so each live row's cache is
    what the lockstep path's would be. Compaction is decided in :meth:`land`, for the step after the launched one.
    """

    def __init__(
        self, step: StaticDecodeStep, cache: KVCache, samples: list[SampleState], stats: dict[str, int]
    ) -> None:
        super().__init__(step, cache, samples, stats)
        self.bucket_tokens: dict[int, torch.Tensor] = {}  # per bucket: the tokens its rows append, on the device
        self.launched: torch.Tensor | None = None

    def launch(self, live: list[int], tokens: torch.Tensor) -> None:
        """Run the step on the current bucket, ``tokens`` int64 [len(live)] (sampled, in ``live`` order, any
        device) going to the rows of ``live``; nothing advances until :meth:`land`."""
        b = self.bucket
        rows = [self.row_of[i] for i in live]
        fed = self.bucket_tokens.get(b)
        if fed is None:
            fed = self.bucket_tokens[b] = torch.zeros(b, dtype=torch.long, device=self.device)
        fed.index_copy_(0, _device_index(rows, self.device), tokens.to(self.device))
        positions = torch.zeros(b, dtype=torch.long)
        positions[rows] = torch.tensor([self.samples[i].next_pos for i in live])
        self.launched = self.step.run(fed, positions)
        self.stats["row_steps"] += b

    def land(self, live: list[int], spliced: Spliced) -> torch.Tensor:
        """The next-token logits [len(live), V] of the samples still ``live`` (ascending) after the launched step,
        the ``spliced`` ones' from their chunks."""
        plain = [i for i in live if i not in spliced]
        for i in plain:
            self.samples[i].next_pos += 1
        self.cache.lengths[torch.tensor([self.row_of[i] for i in plain], dtype=torch.long)] += 1
        rows = [self.row_of[i] for i in live]
        logits = self.launched
        if rows != list(range(self.bucket)):
            logits = logits[_device_index(rows, self.device)]
        if spliced:
            splicing = [i for i in live if i in spliced]
            at = [k for k, i in enumerate(live) if i in spliced]
            logits = logits.clone() if logits is self.launched else logits  # the graph's output buffer stays intact
            logits[_device_index(at, self.device)] = self._extend(splicing, spliced).to(logits.dtype)
        self._compact(live)
        self.stats["captures"] = self.step.num_captures - self.captures_before
        return logits
