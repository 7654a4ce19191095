"""Batched sampling with a KV cache, and interleaved images spliced into a sample mid-generation.

Each prompt is prefilled once (packed, varlen attention) and its cache rows copied to its G samples. Every step
then appends one chunk per live sample: normally the token just sampled, but for a sample whose newest token
completed ``focus_trigger`` (it may run past it: a BPE token such as ``><``) the chunk is that token followed by
``<|vision_start|> <|image_pad|>*n <|vision_end|>`` for each image the focus hook returned. The images of all
such samples are preprocessed and encoded by the vision tower in one batch; the pads' embeddings are replaced by
the vision features, the chunk's M-RoPE ids continue the sample's own position counter, and its K/V land in the
sample's cache row. The result is exactly the sequence a full forward over the spliced tokens would see (the
tests prove it logit for logit).

Steps where every row appends one token run as a :class:`StaticDecodeStep` (``decode="graph"``, the default: a
CUDA graph on CUDA, the same static step eagerly on the CPU; ``"static"``: never a graph); steps that splice
images in, and every step with ``decode="eager"``, go through the model's modules.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .decoder import KVCache
from .model import VLModel
from .processor import Processor
from .rope import mrope_position_ids
from .static_decode import StaticDecodeStep

DECODE_MODES = ("graph", "static", "eager")


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


@dataclass
class _Sample:
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


class _TextStream:
    """Incremental byte-level decoding: tokens are held back while they end inside a UTF-8 character."""

    def __init__(self, processor: Processor) -> None:
        self.tokenizer = processor.tokenizer

    def push(self, s: _Sample, token: int) -> str:
        s.pending.append(token)
        piece = self.tokenizer.decode(s.pending, skip_special_tokens=True)
        if piece.endswith("\ufffd") and len(s.pending) < 4:
            return ""
        s.pending.clear()
        s.text += piece
        return piece


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
) -> list[Rollout]:
    """Sample ``num_samples`` completions per prompt (dicts from ``Processor.apply_chat_template``).

    Rollouts come back prompt-major: prompt 0's samples 0..G-1, then prompt 1's, ... See the module docstring for
    the focus hook; it is called once per step with all triggering samples and must return, per request, a list
    of images (uint8 [H,W,3] or float [3,H,W] in [0,1]) or None. ``decode``: see the module docstring.
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
    eos = set(tok.eos_token_ids)
    banned = torch.tensor(
        [cfg.image_token_id, cfg.video_token_id, cfg.vision_start_token_id, cfg.vision_end_token_id], device=device
    )
    stream = _TextStream(processor)
    cache, logits, samples = _prefill(model, prompts, num_samples, max_new_tokens)
    static_step = None if decode == "eager" else StaticDecodeStep(model, cache, cuda_graph=decode == "graph")
    rows = torch.arange(len(samples))
    while True:
        tokens, logps = sample_tokens(logits, temperature, top_p, generator, banned)
        requests: list[tuple[int, FocusRequest]] = []
        for r, t, lp in zip(rows.tolist(), tokens.tolist(), logps.tolist()):
            s = samples[r]
            s.ids.append(t)
            s.mask.append(True)
            s.logprobs.append(lp)
            s.new_tokens += 1
            piece = "" if t in eos else stream.push(s, t)
            if t in eos or any(stop in s.text[-(len(stop) + len(piece)) :] for stop in stop_strings if piece):
                s.finished = s.done = True
            elif s.new_tokens >= max_new_tokens:
                s.done = True
            elif (
                focus_hook is not None
                and s.focus_steps < max_focus_steps
                and piece
                and focus_trigger in s.text[-(len(focus_trigger) + len(piece) - 1) :]  # a BPE token may run past it
            ):
                upto = s.text.rindex(focus_trigger) + len(focus_trigger)  # the hook reads the text up to the trigger
                requests.append((r, FocusRequest(s.prompt_index, s.sample_index, s.text[:upto])))
        spliced = _run_focus_hook(model, processor, focus_hook, requests, samples, device) if requests else {}
        rows = torch.tensor([r for r in rows.tolist() if not samples[r].done])
        if len(rows) == 0:
            break
        if static_step is not None and not spliced:
            logits = _static_step(static_step, samples, rows)
        else:
            logits = _append_step(model, cache, samples, rows, spliced)

    out = []
    for s in samples:
        out.append(
            Rollout(
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
        )
    return out


def _prefill(
    model: VLModel, prompts: list[dict], g: int, max_new_tokens: int
) -> tuple[KVCache, torch.Tensor, list[_Sample]]:
    """Run every prompt once (packed), copy its cache row to its g sample rows; logits [P*g, V] of the next token."""
    cfg = model.config
    device, dtype = model.lm_head_weight.device, model.lm_head_weight.dtype
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
    t = cfg.text
    capacity = int(lens.max()) + max_new_tokens + 1  # grows when images are spliced in
    cache = KVCache(t.num_hidden_layers, len(prompts) * g, t.num_key_value_heads, t.head_dim, capacity, dtype, device)
    first_rows = torch.arange(len(prompts)) * g
    pv = torch.cat(pv_list).to(device) if pv_list else None
    x = model.embed(torch.cat(ids_list).to(device), pv, torch.cat(grid_list) if grid_list else None)
    view = cache.plan(first_rows, lens, prefill=True)
    hidden = model.run_layers(x, torch.cat(pos_list, dim=1), None, cache, view)
    last = (torch.cumsum(lens, 0) - 1).to(device)
    logits = F.linear(hidden[last], model.lm_head_weight).repeat_interleave(g, dim=0)
    for k in range(1, g):
        cache.copy_rows(first_rows, first_rows + k)
    samples = []
    for i, p in enumerate(prompts):
        has_images = p.get("pixel_values") is not None
        n = len(ids_list[i])
        for j in range(g):
            samples.append(
                _Sample(
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


def _append_step(
    model: VLModel,
    cache: KVCache,
    samples: list[_Sample],
    rows: torch.Tensor,
    spliced: dict[int, tuple[list[int], torch.Tensor, torch.Tensor]],
) -> torch.Tensor:
    """Feed each live row its last sampled token (plus spliced vision tokens) → next-token logits [n, V]."""
    cfg = model.config
    device = model.lm_head_weight.device
    chunk_ids, chunk_pos, counts, feats = [], [], [], []
    for r in rows.tolist():
        s = samples[r]
        images = spliced.get(r)
        if images is None:  # the common case: one token at the sample's next position
            chunk_ids.append(s.ids[-1])
            chunk_pos.append(torch.full((3, 1), s.next_pos))
            s.next_pos += 1
            counts.append(1)
            continue
        ids = [s.ids[-1], *images[0]]
        pos = mrope_position_ids(torch.tensor(ids), images[1], cfg, start=s.next_pos)
        s.next_pos = int(pos.max()) + 1
        s.ids += images[0]
        s.mask += [False] * len(images[0])
        s.logprobs += [0.0] * len(images[0])
        chunk_ids += ids
        chunk_pos.append(pos)
        counts.append(len(ids))
        feats.append(images[2])
    ids_t = torch.tensor(chunk_ids, device=device)
    x = model.model.embed_tokens(ids_t)
    if feats:
        x = x.masked_scatter((ids_t == cfg.image_token_id).unsqueeze(-1), torch.cat(feats).to(x.dtype))
    counts_t = torch.tensor(counts)
    view = cache.plan(rows, counts_t)
    hidden = model.run_layers(x, torch.cat(chunk_pos, dim=1), None, cache, view)
    return F.linear(hidden[(torch.cumsum(counts_t, 0) - 1).to(device)], model.lm_head_weight)


def _static_step(step: StaticDecodeStep, samples: list[_Sample], rows: torch.Tensor) -> torch.Tensor:
    """Every cache row appends its last token (a finished row's output is dropped and its cache does not grow)
    → logits [n, V] of the live ``rows``."""
    tokens = torch.tensor([s.ids[-1] for s in samples])
    positions = torch.tensor([s.next_pos for s in samples])
    for r in rows.tolist():
        samples[r].next_pos += 1
    logits = step.step(tokens, positions, rows)
    return logits if len(rows) == len(samples) else logits[rows.to(logits.device)]


def _run_focus_hook(
    model: VLModel,
    processor: Processor,
    hook: FocusHook,
    requests: list[tuple[int, FocusRequest]],
    samples: list[_Sample],
    device: torch.device,
) -> dict[int, tuple[list[int], torch.Tensor, torch.Tensor]]:
    """Call the hook once for all requests; encode every returned image in one vision batch.

    Returns row → (vision token ids to splice, image_grid_thw [k, 3], vision features [n_pads, H]).
    """
    results = hook([req for _, req in requests])
    if len(results) != len(requests):
        raise ValueError(f"focus_hook returned {len(results)} results for {len(requests)} requests")
    tok = processor.tokenizer
    per_row, all_pv, all_grid = [], [], []
    for (r, _), images in zip(requests, results):
        if not images:
            continue
        pv, grid = processor.preprocess_images(list(images))
        per_row.append((r, grid))
        all_pv.append(pv)
        all_grid.append(grid)
        s = samples[r]
        s.pixel_values.append(pv)
        s.grids.append(grid)
        s.focus_steps += 1
    if not per_row:
        return {}
    feats = model.visual(torch.cat(all_pv).to(device), torch.cat(all_grid))
    out, offset = {}, 0
    for r, grid in per_row:
        ids = []
        for n in processor.image_tokens(grid):
            ids += [tok.vision_start_id] + [tok.image_pad_id] * n + [tok.vision_end_id]
        n_pads = sum(processor.image_tokens(grid))
        out[r] = (ids, grid, feats[offset : offset + n_pads])
        offset += n_pads
    return out
