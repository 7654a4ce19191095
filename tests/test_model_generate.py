"""Generation: sampling controls, stop conditions, and the focus hook splicing images into one sample's cache."""

import copy

import pytest
import torch

from engine.config import LoRAConfig
from engine.models import (
    create_tiny_checkpoint,
    from_pretrained,
    generate,
    mrope_position_ids,
    processor_from_pretrained,
)
from engine.models.decode_steps import bucket_sizes
from engine.models.decoder import KVCache
from engine.models.generate import DecodeEngine, _HostBookkeeping
from engine.models.model import VLModel
from engine.models.static_decode import StaticDecodeStep
from engine.train.lora import apply_lora, lora_modules


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    # A near-uniform random policy (std 0.02): its greedy completions run long and vary, so the splices below outgrow
    # the cache and the stop string ends one row early.
    path = create_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "ckpt", seed=0, init_std=0.02)
    model, proc = from_pretrained(path), processor_from_pretrained(path)
    gen = torch.Generator().manual_seed(0)
    image = torch.randint(0, 256, (84, 112, 3), dtype=torch.uint8, generator=gen)
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Where?"}]}]
    prompts = [
        proc.apply_chat_template(msgs, [image], add_generation_prompt=True),
        proc.apply_chat_template([{"role": "user", "content": "hello"}], add_generation_prompt=True),
    ]
    return model, proc, prompts


def full_forward_logprobs(model, r):
    """Log-softmax over a plain full forward of the whole rollout sequence, [T-1, V] (predicting token t+1)."""
    pos = mrope_position_ids(r.input_ids, r.image_grid_thw, model.config)
    cu = torch.tensor([0, len(r.input_ids)], dtype=torch.int32)
    with torch.no_grad():
        hidden = model.forward_packed(r.input_ids, pos, cu, r.pixel_values, r.image_grid_thw)
    return torch.log_softmax(hidden @ model.lm_head_weight.T, -1)[:-1]


def assert_matches_full_forward(model, rollouts, greedy=True):
    """Each sampled token's log-prob equals a full forward's, and (``greedy``) the argmax of the allowed tokens."""
    cfg = model.config
    banned = [cfg.image_token_id, cfg.video_token_id, cfg.vision_start_token_id, cfg.vision_end_token_id]
    for r in rollouts:
        ref = full_forward_logprobs(model, r)
        idx = r.completion_mask.nonzero().squeeze(1)
        torch.testing.assert_close(r.logprobs[idx], ref[idx - 1, r.input_ids[idx]], atol=1e-4, rtol=0)
        if greedy:
            allowed = ref[idx - 1].index_fill(-1, torch.tensor(banned), float("-inf"))
            assert torch.equal(allowed.argmax(-1), r.input_ids[idx])


def test_focus_hook_splices_into_cache_exactly(setup):
    model, proc, prompts = setup
    crop = torch.rand(3, 56, 84, generator=torch.Generator().manual_seed(3))
    calls = []

    def hook(requests):
        calls.append([(q.prompt_index, q.sample_index, q.completion_text) for q in requests])
        return [[crop] if q.sample_index == 0 else None for q in requests]

    rollouts = generate(
        model,
        proc,
        prompts,
        num_samples=2,
        max_new_tokens=8,
        temperature=1.0,
        focus_hook=hook,
        focus_trigger="",
        max_focus_steps=2,
        generator=torch.Generator().manual_seed(1),
    )
    assert [(r.prompt_index, r.sample_index) for r in rollouts] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert len(calls[0]) >= 2  # one batched call for all samples that triggered at that step
    tok = proc.tokenizer
    for r in rollouts:
        assert int(r.completion_mask.sum()) == 8
        expected_steps = 2 if r.sample_index == 0 else 0
        assert r.num_focus_steps == expected_steps
        n_images = (1 if r.prompt_index == 0 else 0) + expected_steps
        assert (0 if r.image_grid_thw is None else len(r.image_grid_thw)) == n_images
        assert int((r.input_ids == tok.vision_start_id).sum()) == n_images
        assert not r.completion_mask[r.input_ids == tok.image_pad_id].any()
        assert r.text == tok.decode(r.input_ids[r.completion_mask].tolist(), skip_special_tokens=True)
        # the cache-spliced continuation equals a full forward over the spliced sequence
        ref = full_forward_logprobs(model, r)
        idx = r.completion_mask.nonzero().squeeze(1)
        torch.testing.assert_close(r.logprobs[idx], ref[idx - 1, r.input_ids[idx]], atol=1e-4, rtol=0)
    spliced = rollouts[0].input_ids
    first_vs = int((spliced == tok.vision_start_id).nonzero()[1])  # [0] is the prompt's own image
    assert rollouts[0].completion_mask[first_vs - 1]  # right after a sampled token


def test_decode_fast_path_and_mixed_step_match_full_forward(setup, monkeypatch):
    """Greedy, ``decode="eager"``: steps where every row appends one token take the gather-free fast path; the
    step that splices an image into one sample (a multi-token chunk beside single tokens) takes the gather path;
    both match a full forward token for token and logit for logit."""
    model, proc, prompts = setup
    plans, plan = [], KVCache.plan

    def spy(self, rows, counts, prefill=False):
        view = plan(self, rows, counts, prefill)
        plans.append((prefill, counts.tolist(), view))
        return view

    monkeypatch.setattr(KVCache, "plan", spy)
    crop = torch.rand(3, 56, 84, generator=torch.Generator().manual_seed(4))

    def hook(requests):  # only prompt 0's sample 1 gets an image
        return [[crop] if (q.prompt_index, q.sample_index) == (0, 1) else None for q in requests]

    rollouts = generate(
        model,
        proc,
        prompts,
        2,
        6,
        temperature=0.0,
        focus_hook=hook,
        focus_trigger="",
        max_focus_steps=1,
        decode="eager",
    )
    assert [r.num_focus_steps for r in rollouts] == [0, 1, 0, 0]
    assert plans[0][0] and not plans[0][2].one_token_per_row  # prefill
    for prefill, counts, view in plans[1:]:
        single = max(counts) == 1
        assert not prefill and view.one_token_per_row == single and (view.q_index is None) == single
    mixed = [counts for _, counts, _ in plans[1:] if max(counts) > 1]
    assert len(mixed) == 1 and sorted(mixed[0])[-2] == 1  # one spliced chunk, single tokens in the other rows
    assert len(plans) > 2  # fast-path steps ran too
    assert_matches_full_forward(model, rollouts)


def test_static_decode_matches_eager_and_full_forward_across_splices_and_growth(setup, monkeypatch):
    """The static step (all rows, fused q/k/v, length mask) gives the eager path's tokens and log-probs. The
    spliced views outgrow the cache (it is reallocated between static steps) and one row finishes early (a stop
    string), so finished rows keep appending throw-away tokens without disturbing the live ones."""
    model, proc, prompts = setup
    static_calls, step = [], StaticDecodeStep.step

    def spy(self, tokens, positions, live):
        static_calls.append(self.cache.capacity)
        return step(self, tokens, positions, live)

    monkeypatch.setattr(StaticDecodeStep, "step", spy)
    crop = torch.rand(3, 112, 112, generator=torch.Generator().manual_seed(5))

    def hook(requests):
        return [[crop, crop] if q.sample_index == 1 else None for q in requests]

    greedy = generate(model, proc, prompts, 2, 12, temperature=0.0, decode="eager")
    stop = greedy[2].text[4:6]
    kwargs = dict(temperature=0.0, focus_hook=hook, focus_trigger="", max_focus_steps=2, stop_strings=(stop,))
    eager = generate(model, proc, prompts, 2, 12, decode="eager", **kwargs)
    assert not static_calls
    static = generate(model, proc, prompts, 2, 12, decode="static", **kwargs)
    assert len(set(static_calls)) > 1  # the cache grew between static steps
    assert [r.num_focus_steps for r in static] == [r.num_focus_steps for r in eager]
    assert static[1].num_focus_steps == 2 and static[0].num_focus_steps == 0
    assert static[2].finished and int(static[2].completion_mask.sum()) < 12
    for a, b in zip(eager, static):
        assert a.input_ids.tolist() == b.input_ids.tolist() and a.finished == b.finished
        torch.testing.assert_close(a.logprobs, b.logprobs, atol=1e-5, rtol=0)
    assert_matches_full_forward(model, static, greedy=False)


def test_static_step_equals_module_step_and_finished_rows_do_not_advance(setup):
    """One static step on 3 cache rows of different lengths, row 1 finished: the live rows' logits and cache
    writes equal the module path's (``VLModel.run_layers`` on a copy of the cache); row 1's length stays put."""
    model, _, _ = setup
    t = model.config.text
    gen = torch.Generator().manual_seed(8)
    lengths = [5, 2, 7]
    static_cache = KVCache(t.num_hidden_layers, 3, t.num_key_value_heads, t.head_dim, 8, torch.float32, "cpu")
    for layer in static_cache.k + static_cache.v:
        layer.copy_(torch.randn(layer.shape, generator=gen))
    static_cache.lengths = torch.tensor(lengths)
    module_cache = KVCache(t.num_hidden_layers, 3, t.num_key_value_heads, t.head_dim, 8, torch.float32, "cpu")
    module_cache.k = [k.clone() for k in static_cache.k]
    module_cache.v = [v.clone() for v in static_cache.v]
    module_cache.lengths = static_cache.lengths.clone()
    tokens, positions, live = torch.tensor([11, 12, 13]), torch.tensor([9, 4, 20]), torch.tensor([0, 2])
    with torch.no_grad():
        logits = StaticDecodeStep(model, static_cache, cuda_graph=False).step(tokens, positions, live)
        view = module_cache.plan(live, torch.ones(len(live), dtype=torch.long))
        x = model.model.embed_tokens(tokens[live])
        hidden = model.run_layers(x, positions[live].expand(3, -1), None, module_cache, view)
        expected = hidden @ model.lm_head_weight.T
    assert logits.shape == (3, t.vocab_size)
    torch.testing.assert_close(logits[live], expected, atol=1e-5, rtol=0)
    assert static_cache.lengths.tolist() == [6, 2, 8] == module_cache.lengths.tolist()
    for a, b in zip(static_cache.k + static_cache.v, module_cache.k + module_cache.v):
        for row in live.tolist():
            torch.testing.assert_close(a[row, :, : lengths[row] + 1], b[row, :, : lengths[row] + 1], atol=1e-6, rtol=0)


def test_static_decode_applies_lora_adapters(setup):
    """With adapters on (non-zero B, dropout 0; k_proj not adapted, so the fused q/k/v low-rank product has a gap),
    the static step samples what the module path does."""
    _, proc, prompts = setup
    model = copy.deepcopy(setup[0])
    apply_lora(model, LoRAConfig(rank=4, alpha=8, dropout=0.0, target_modules=("q_proj", "v_proj", "down_proj")))
    with torch.no_grad():
        for _, module in lora_modules(model):
            module.lora_B.normal_(0, 0.5, generator=torch.Generator().manual_seed(6))
    plain = generate(setup[0], proc, prompts, 2, 8, temperature=0.0, decode="eager")
    eager = generate(model, proc, prompts, 2, 8, temperature=0.0, decode="eager")
    static = generate(model, proc, prompts, 2, 8, temperature=0.0, decode="static")
    assert [r.input_ids.tolist() for r in plain] != [r.input_ids.tolist() for r in eager]  # the adapters matter
    for a, b in zip(eager, static):
        assert a.input_ids.tolist() == b.input_ids.tolist()
        torch.testing.assert_close(a.logprobs, b.logprobs, atol=1e-5, rtol=0)


def test_unknown_decode_mode_is_an_error(setup):
    model, proc, prompts = setup
    with pytest.raises(ValueError, match="decode must be one of"):
        generate(model, proc, prompts, 1, 2, decode="cuda")


@pytest.mark.gpu
def test_cuda_graph_decode_matches_eager_on_gpu(setup):
    """bf16 on CUDA: the captured graph replays the static step; log-probs match the eager module path."""
    _, proc, prompts = setup
    model = copy.deepcopy(setup[0]).to("cuda", torch.bfloat16)
    crop = torch.rand(3, 56, 84, generator=torch.Generator().manual_seed(7))

    def hook(requests):
        return [[crop] if q.sample_index == 0 else None for q in requests]

    kwargs = dict(temperature=0.0, focus_hook=hook, focus_trigger="", max_focus_steps=1)
    eager = generate(model, proc, prompts, 2, 10, decode="eager", **kwargs)
    graph = generate(model, proc, prompts, 2, 10, decode="graph", **kwargs)
    for a, b in zip(eager, graph):
        n = int(a.completion_mask.sum())
        assert n == int(b.completion_mask.sum()) == 10
        same = (a.input_ids == b.input_ids).all()
        if same:  # bf16 ties may flip a greedy choice; then only the prefix before it is comparable
            torch.testing.assert_close(a.logprobs, b.logprobs, atol=5e-2, rtol=0)
    assert sum(bool((a.input_ids == b.input_ids).all()) for a, b in zip(eager, graph)) >= 3


def test_cached_step_on_unordered_rows_matches_full_attention(setup):
    """A step on rows [2, 0] (not a range, so cache rows are gathered) appending 3 and 1 tokens equals causal
    attention over each row's whole sequence; skipped row 1 keeps its cache across the capacity growth."""
    model, _, _ = setup
    attn, t = model.model.layers[0].self_attn, model.config.text
    gen = torch.Generator().manual_seed(2)
    first, rows, counts = [2, 4, 3], [2, 0], [3, 1]
    seqs = [torch.randn(n, t.hidden_size, generator=gen) for n in (3, 4, 6)]

    @torch.no_grad()
    def run(xs, pos, cu=None, view=None):
        cos, sin = model.rope(torch.cat(pos).expand(3, -1), xs[0].dtype)
        return attn(torch.cat(xs), cos, sin, cu, None if view is None else (cache.k[0], cache.v[0], view))

    cache = KVCache(1, 3, t.num_key_value_heads, t.head_dim, 4, torch.float32, "cpu")
    view = cache.plan(torch.arange(3), torch.tensor(first), prefill=True)
    run([x[:n] for x, n in zip(seqs, first)], [torch.arange(n) for n in first], view=view)
    kept = cache.k[0][1, :, :4].clone()
    view = cache.plan(torch.tensor(rows), torch.tensor(counts))
    assert view.row_range is None and not view.one_token_per_row and cache.capacity > 4
    out = run([seqs[r][first[r] :] for r in rows], [torch.arange(first[r], len(seqs[r])) for r in rows], view=view)
    ref = [
        run([seqs[r]], [torch.arange(len(seqs[r]))], torch.tensor([0, len(seqs[r])], dtype=torch.int32)) for r in rows
    ]
    torch.testing.assert_close(out, torch.cat([ref[0][first[2] :], ref[1][first[0] :]]), atol=1e-5, rtol=0)
    assert cache.lengths.tolist() == [3, 4, 6] and torch.equal(cache.k[0][1, :, :4], kept)


def test_focus_steps_capped_and_hook_not_called_without_cap(setup):
    model, proc, prompts = setup
    calls = []

    def hook(requests):
        calls.append(len(requests))
        return [[torch.rand(3, 28, 28)] for _ in requests]

    rollouts = generate(model, proc, prompts[1:], 1, 6, focus_hook=hook, focus_trigger="", max_focus_steps=1)
    assert rollouts[0].num_focus_steps == 1 and calls == [1]
    calls.clear()
    generate(model, proc, prompts[1:], 1, 4, focus_hook=hook, focus_trigger="", max_focus_steps=0)
    assert calls == []


def test_top_p_tiny_is_greedy_and_seed_determinism(setup):
    model, proc, prompts = setup
    greedy = generate(model, proc, prompts, 1, 6, temperature=0.0)
    nucleus = generate(
        model, proc, prompts, 1, 6, temperature=1.0, top_p=1e-6, generator=torch.Generator().manual_seed(5)
    )
    assert [r.input_ids.tolist() for r in greedy] == [r.input_ids.tolist() for r in nucleus]
    a = generate(model, proc, prompts, 3, 6, generator=torch.Generator().manual_seed(7))
    b = generate(model, proc, prompts, 3, 6, generator=torch.Generator().manual_seed(7))
    c = generate(model, proc, prompts, 3, 6, generator=torch.Generator().manual_seed(8))
    assert [r.input_ids.tolist() for r in a] == [r.input_ids.tolist() for r in b]
    assert [r.input_ids.tolist() for r in a] != [r.input_ids.tolist() for r in c]


def test_stop_string_and_length(setup):
    model, proc, prompts = setup
    greedy = generate(model, proc, prompts[1:], 1, 6, temperature=0.0)[0]
    assert not greedy.finished and int(greedy.completion_mask.sum()) == 6
    stop = greedy.text[1:3]
    stopped = generate(model, proc, prompts[1:], 1, 6, temperature=0.0, stop_strings=(stop,))[0]
    last = proc.tokenizer.decode(stopped.input_ids[-1:].tolist())  # a BPE token may run past the stop string
    assert stopped.finished and stop in stopped.text and stop not in stopped.text[: len(stopped.text) - len(last)]
    assert len(stopped.text) < len(greedy.text)


def _lora_model(
    base, dropout=0.0, targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
):
    model = copy.deepcopy(base)
    apply_lora(model, LoRAConfig(rank=4, alpha=8, dropout=dropout, target_modules=targets))
    with torch.no_grad():
        gen = torch.Generator().manual_seed(6)
        for _, module in lora_modules(model):
            module.lora_B.normal_(0, 0.5, generator=gen)
    return model


def test_rollouts_sample_in_eval_mode_whatever_the_model_mode(setup):
    """Finding 3: a model left in training mode (as the Trainer leaves it) with LoRA dropout 0.5 still samples
    the policy itself: prefill and the crop-splice steps (module path, eager) run without dropout, so two
    rollouts with the same seed are identical and equal the static path token for token; every module's mode
    is restored afterwards (the vision tower, here in eval, stays in eval)."""
    _, proc, prompts = setup
    model = _lora_model(setup[0], dropout=0.5)
    model.train()
    model.visual.eval()
    modes = {name: m.training for name, m in model.named_modules()}
    crop = torch.rand(3, 56, 56, generator=torch.Generator().manual_seed(9))

    def hook(requests):
        return [[crop] if q.sample_index == 0 else None for q in requests]

    kwargs = dict(focus_hook=hook, focus_trigger="", max_focus_steps=2)

    def run(decode):
        return generate(
            model, proc, prompts, 2, 10, generator=torch.Generator().manual_seed(3), decode=decode, **kwargs
        )

    first, second, static, graph = run("eager"), run("eager"), run("static"), run("graph")
    assert sum(r.num_focus_steps for r in first) == 4
    for a, b, c, d in zip(first, second, static, graph):
        assert a.input_ids.tolist() == b.input_ids.tolist() == c.input_ids.tolist() == d.input_ids.tolist()
        assert torch.equal(a.logprobs, b.logprobs)
        torch.testing.assert_close(a.logprobs, c.logprobs, atol=1e-5, rtol=0)
    assert {name: m.training for name, m in model.named_modules()} == modes
    assert_matches_full_forward(model.eval(), first, greedy=False)  # the sampled log-probs are the eval-mode policy's


def test_bucket_sizes():
    assert bucket_sizes(1) == [1]
    assert bucket_sizes(8) == [1, 2, 4, 8]
    assert bucket_sizes(12) == [1, 2, 4, 8, 12]


def test_finished_rows_leave_the_static_batch(setup, monkeypatch):
    """Finding 4: rows that finish (a stop string, at temperature 1) leave the decode batch. The live rows are moved
    down into the smallest power-of-two bucket that holds them, so the static step computes what the live rows
    cost, never a row beyond the bucket, each bucket's shapes fixed (one graph each on GPU); the tokens and
    log-probs equal the eager path's (which only ever runs the live rows) for the same seed."""
    model, proc, prompts = setup
    buckets, step = [], StaticDecodeStep.step

    def spy(self, tokens, positions, live):
        buckets.append((len(tokens), len(live)))
        return step(self, tokens, positions, live)

    monkeypatch.setattr(StaticDecodeStep, "step", spy)
    kwargs = dict(stop_strings=("o",), temperature=1.0)
    eager = generate(model, proc, prompts, 4, 24, generator=torch.Generator().manual_seed(3), decode="eager", **kwargs)
    engine = DecodeEngine()
    static = generate(
        model, proc, prompts, 4, 24, generator=torch.Generator().manual_seed(3), decode="static", engine=engine,
        **kwargs,
    )  # fmt: skip
    lengths = [int(r.completion_mask.sum()) for r in static]
    assert len(set(lengths)) >= 4 and max(lengths) > 2 * min(lengths)  # rows end at many different steps
    for a, b in zip(eager, static):
        assert a.input_ids.tolist() == b.input_ids.tolist() and a.finished == b.finished
        torch.testing.assert_close(a.logprobs, b.logprobs, atol=1e-5, rtol=0)
    sizes = [b for b, _ in buckets]
    assert sizes == sorted(sizes, reverse=True) and set(sizes) <= set(bucket_sizes(8)) and len(set(sizes)) >= 3
    assert all(live <= b and (b == 1 or live > b // 2 or b == 8) for b, live in buckets)
    stats = engine.stats
    assert stats["compactions"] == len(set(sizes)) - 1
    assert stats["row_steps"] == sum(sizes) < 8 * stats["steps"]  # without compaction: 8 rows every step
    assert stats["live_row_steps"] == sum(lengths) - len(lengths)  # a step per token after the first
    assert sorted(engine.step.graphs) == sorted(set(sizes))  # one static input buffer (graph on GPU) per bucket


def test_async_decode_launches_ahead_of_the_host_and_equals_lockstep(setup, monkeypatch):
    """``decode="graph_async"`` (on CPU: the static step, eagerly): step k+1 is launched from step k's sampled
    tokens before the host records them, so stop strings and finished rows are handled one step behind. Rows
    finish at many different steps (stop strings at temperature 1) and the tokens, log-probs and finished flags
    equal the lockstep static path's for the same seed (the sampler draws the same live rows; a finished row
    leaves the bucket one step later, so more rows are computed, never a different live row)."""
    model, proc, prompts = setup
    events = []
    run, record = StaticDecodeStep.run, _HostBookkeeping.record

    def spy_run(self, tokens, positions):
        events.append(("run", tokens.clone()))
        return run(self, tokens, positions)

    def spy_record(self, live, tokens, logps):
        events.append(("record", list(tokens)))
        return record(self, live, tokens, logps)

    monkeypatch.setattr(StaticDecodeStep, "run", spy_run)
    monkeypatch.setattr(_HostBookkeeping, "record", spy_record)
    kwargs = dict(stop_strings=("o",), temperature=1.0)
    out = {}
    for decode in ("static", "graph_async"):
        events.clear()
        engine = DecodeEngine()
        rollouts = generate(
            model, proc, prompts, 4, 24, generator=torch.Generator().manual_seed(3), decode=decode, engine=engine,
            **kwargs,
        )  # fmt: skip
        out[decode] = (rollouts, dict(engine.stats), [kind for kind, _ in events], events[:2])
    (lock, lock_stats, lock_order, _), (ahead, stats, order, first) = out["static"], out["graph_async"]
    assert lock_order[:4] == ["record", "run", "record", "run"]
    assert order[:4] == ["run", "record", "run", "record"]  # step 1 runs before the host has read step 0's tokens
    (_, fed), (_, recorded) = first
    assert fed.tolist() == recorded  # step 0's tokens, as sampled, fed to all 8 rows
    lengths = [int(r.completion_mask.sum()) for r in ahead]
    assert len(set(lengths)) >= 4 and max(lengths) > 2 * min(lengths)  # rows end at many different steps
    for a, b in zip(lock, ahead):
        assert a.input_ids.tolist() == b.input_ids.tolist() and a.finished == b.finished
        torch.testing.assert_close(a.logprobs, b.logprobs, atol=1e-6, rtol=0)
    assert stats["steps"] == lock_stats["steps"] and stats["live_row_steps"] == lock_stats["live_row_steps"]
    assert stats["compactions"] >= 1 and lock_stats["row_steps"] <= stats["row_steps"] < 8 * stats["steps"]
    assert order.count("run") == stats["steps"] + (max(lengths) < 24)  # a last launch nobody reads if all stopped


def test_static_step_is_built_once_references_the_weights_and_sees_updates(setup, monkeypatch):
    """The static step and the KV cache live in the DecodeEngine across generate calls: built once, the cache
    allocated once to capacity (it never grows), LoRA applied as the low-rank product on the model's own
    parameters (no merged copy; the only copies are the fused q/k/v buffers). After an optimiser-like update of
    adapters, a base weight and a norm, the next call samples what the eager path samples from the new weights."""
    _, proc, prompts = setup
    model = _lora_model(setup[0])
    grown, ensure = [], KVCache.ensure

    def spy(self, needed):
        if needed > self.capacity:
            grown.append(needed)
        return ensure(self, needed)

    monkeypatch.setattr(KVCache, "ensure", spy)
    engine = DecodeEngine()
    kwargs = dict(temperature=1.0, engine=engine, decode="static")
    first = generate(model, proc, prompts, 2, 8, generator=torch.Generator().manual_seed(4), **kwargs)
    step, cache = engine.step, engine.cache
    ptrs = [t.data_ptr() for t in cache.k + cache.v]
    params = {p.data_ptr() for p in model.parameters()}
    layer, attn = step.layers[0], model.model.layers[0].self_attn
    for lin, module in ((layer.o_proj, attn.o_proj), (layer.down_proj, model.model.layers[0].mlp.down_proj)):
        assert lin.weight.data_ptr() == module.weight.data_ptr() and lin.lora_A.data_ptr() == module.lora_A.data_ptr()
    copies = [t for w in step.layers for t in w.tensors() if t.data_ptr() not in params]
    assert {t.data_ptr() for t in copies} == {t.data_ptr() for w in step.layers for t in w.qkv.tensors()}
    t = model.config.text
    qkv_rows = (t.num_attention_heads + 2 * t.num_key_value_heads) * t.head_dim
    assert layer.qkv.lora_A.shape == (3 * 4, t.hidden_size) and layer.qkv.lora_B.shape == (qkv_rows, 3 * 4)

    with torch.no_grad():
        gen = torch.Generator().manual_seed(11)
        for _, module in lora_modules(model):
            module.lora_B.add_(torch.randn(module.lora_B.shape, generator=gen) * 0.5)
        attn.q_proj.weight.add_(torch.randn(attn.q_proj.weight.shape, generator=gen) * 0.1)
        model.model.layers[1].post_attention_layernorm.weight.mul_(1.5)
    second = generate(model, proc, prompts, 2, 8, generator=torch.Generator().manual_seed(4), **kwargs)
    eager = generate(model, proc, prompts, 2, 8, generator=torch.Generator().manual_seed(4), decode="eager")
    assert engine.num_builds == 1 and engine.step is step and engine.cache is cache
    assert [t.data_ptr() for t in cache.k + cache.v] == ptrs and not grown
    assert [r.input_ids.tolist() for r in first] != [r.input_ids.tolist() for r in second]  # the update mattered
    for a, b in zip(eager, second):
        assert a.input_ids.tolist() == b.input_ids.tolist()
        torch.testing.assert_close(a.logprobs, b.logprobs, atol=1e-5, rtol=0)
    engine.release()
    assert engine.cache is None and engine.step is step


@pytest.mark.parametrize("decode", ["static", "graph_async"])
def test_splice_steps_feed_only_the_splicing_rows_and_skip_the_module_path(setup, monkeypatch, decode):
    """Finding 5: a step that splices views feeds the new view tokens of the rows that get them in one batched
    multi-token call (StaticDecodeStep.extend, one call per such step, those rows only) while the other live rows
    take the static step; the model's module path runs once, for the prompt prefill. Same tokens and log-probs
    as the eager (module) path, which equals a full forward over the spliced sequences. ``graph_async`` too: its
    splicing rows were already fed their trigger token by the step launched ahead, which ``extend`` rewrites."""
    model, proc, prompts = setup
    runs, extends = [], []
    run_layers, extend = VLModel.run_layers, StaticDecodeStep.extend

    def spy_run(self, *args, **kwargs):
        runs.append(1)
        return run_layers(self, *args, **kwargs)

    def spy_extend(self, x, position_ids, view):
        extends.append(len(view.rows))
        return extend(self, x, position_ids, view)

    monkeypatch.setattr(VLModel, "run_layers", spy_run)
    monkeypatch.setattr(StaticDecodeStep, "extend", spy_extend)
    crops = [torch.rand(3, 56, 84, generator=torch.Generator().manual_seed(k)) for k in range(2)]

    def hook(requests):  # sample 0 of each prompt gets two views per focus step, sample 2 one, the others none
        return [crops if q.sample_index == 0 else crops[:1] if q.sample_index == 2 else None for q in requests]

    kwargs = dict(temperature=1.0, focus_hook=hook, focus_trigger="", max_focus_steps=2, stop_strings=("o",))
    eager = generate(model, proc, prompts, 3, 10, generator=torch.Generator().manual_seed(5), decode="eager", **kwargs)
    eager_runs = len(runs)
    runs.clear()
    engine = DecodeEngine()
    static = generate(
        model, proc, prompts, 3, 10, generator=torch.Generator().manual_seed(5), decode=decode, engine=engine,
        **kwargs,
    )  # fmt: skip
    assert len(runs) == 1 and eager_runs > 1  # static: the prefill only
    assert [r.num_focus_steps for r in static] == [r.num_focus_steps for r in eager]
    assert sum(r.num_focus_steps for r in static) >= 4
    assert extends and max(extends) <= 4 and engine.stats["splice_steps"] == len(extends)
    for a, b in zip(eager, static):
        assert a.input_ids.tolist() == b.input_ids.tolist() and a.finished == b.finished
        torch.testing.assert_close(a.logprobs, b.logprobs, atol=1e-5, rtol=0)
    assert_matches_full_forward(model, static, greedy=False)


def test_decode_engine_cache_is_reused_while_it_fits(setup):
    model = setup[0]
    engine = DecodeEngine()
    a = engine.kv_cache(model, 4, 10)
    a.lengths[:] = 3
    b = engine.kv_cache(model, 8, 5)  # more rows: reallocated once, to the larger of both
    assert b is not a and (b.k[0].shape[0], b.capacity) == (8, 10)
    c = engine.kv_cache(model, 2, 3)
    assert c is b and int(c.lengths.abs().sum()) == 0


@pytest.mark.gpu
def test_cuda_graph_buckets_are_captured_once_and_replayed_across_calls(setup):
    """bf16 on CUDA, finished rows compacted away: one graph per bucket used, captured in the first call; a second
    call with the same engine (weights and cache at the same addresses) replays them without capturing, and its
    tokens equal the static (eager, no-graph) step's."""
    _, proc, prompts = setup
    model = _lora_model(setup[0]).to("cuda", torch.bfloat16)
    engine = DecodeEngine()
    seed = lambda: dict(generator=torch.Generator(device="cuda").manual_seed(3))
    kwargs = dict(stop_strings=("o",), temperature=1.0)
    first = generate(model, proc, prompts, 4, 24, decode="graph", engine=engine, **kwargs, **seed())
    captured = engine.step.num_captures
    assert captured == len(engine.step.graphs) >= 2 and engine.stats["compactions"] >= 1
    second = generate(model, proc, prompts, 4, 24, decode="graph", engine=engine, **kwargs, **seed())
    assert engine.step.num_captures == captured and engine.stats["captures"] == 0
    static = generate(model, proc, prompts, 4, 24, decode="static", **kwargs, **seed())
    assert [r.input_ids.tolist() for r in first] == [r.input_ids.tolist() for r in second]
    same = sum(a.input_ids.tolist() == b.input_ids.tolist() for a, b in zip(first, static))
    assert same >= 6  # bf16: graph and no-graph numerics may differ in the last bit and flip a sampled token


@pytest.mark.gpu
def test_cuda_graph_async_decode_matches_lockstep_graph_on_gpu(setup):
    """bf16 on CUDA, with a splice and finished rows: ``graph_async`` replays the bucket graphs fed from the device
    and samples what the lockstep graph path samples (bf16: a bucket of another size may round differently and
    flip a sampled token); a second call with the same engine captures nothing and repeats its tokens."""
    _, proc, prompts = setup
    model = _lora_model(setup[0]).to("cuda", torch.bfloat16)
    crop = torch.rand(3, 56, 84, generator=torch.Generator().manual_seed(7))

    def hook(requests):
        return [[crop] if q.sample_index == 0 else None for q in requests]

    seed = lambda: dict(generator=torch.Generator(device="cuda").manual_seed(3))
    kwargs = dict(stop_strings=("o",), temperature=1.0, focus_hook=hook, focus_trigger="", max_focus_steps=1)
    lock = generate(model, proc, prompts, 4, 24, decode="graph", **kwargs, **seed())
    engine = DecodeEngine()
    ahead = generate(model, proc, prompts, 4, 24, decode="graph_async", engine=engine, **kwargs, **seed())
    captured = engine.step.num_captures
    assert captured >= 2 and engine.stats["splice_steps"] >= 1 and engine.stats["compactions"] >= 1
    again = generate(model, proc, prompts, 4, 24, decode="graph_async", engine=engine, **kwargs, **seed())
    assert engine.step.num_captures == captured and engine.stats["captures"] == 0
    assert [r.input_ids.tolist() for r in ahead] == [r.input_ids.tolist() for r in again]
    assert sum(r.num_focus_steps for r in ahead) == sum(r.num_focus_steps for r in lock) == 2
    same = sum(a.input_ids.tolist() == b.input_ids.tolist() for a, b in zip(lock, ahead))
    assert same >= 6
