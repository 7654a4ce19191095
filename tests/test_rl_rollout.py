"""Crop-mode rollouts end to end: a scripted policy names a box, the hook's crops are spliced in as views, the
rollout scores and packs, and the GRPO objective runs over the spliced sequence."""

import importlib
from pathlib import Path

import pytest
import torch
from _toys import SCRIPT, micro_config, toy_record

from engine.models import ImageConfig, Processor, Tokenizer, VLModel
from engine.models.packing import pack_rollouts
from engine.models.tiny import init_weights
from engine.models.tokenizer import build_bpe_tokenizer, build_byte_tokenizer
from engine.rl.advantages import group_advantages
from engine.rl.grpo import GRPOMicroBatch, GRPOObjective, RLConfig
from engine.rl.prompts import build_prompt
from engine.rl.rewards import score_completions
from engine.rl.rollout import generate_rollouts

gen_module = importlib.import_module("engine.models.generate")  # the module (the package re-exports the function)


@pytest.mark.parametrize("mode", ["crop", "text"])
def test_scripted_rollout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mode: str) -> None:
    tok = Tokenizer(build_byte_tokenizer())
    cfg = micro_config(tok)
    model = VLModel(cfg)
    init_weights(model, seed=0)
    processor = Processor(tok, ImageConfig(min_pixels=56 * 56, max_pixels=56 * 56))
    script = tok.encode(SCRIPT)
    calls = []

    def scripted(logits, temperature, top_p, generator, banned=()):
        """Every live sample emits the next byte of SCRIPT (log-prob taken from the real logits)."""
        token = script[len(calls)]
        calls.append(token)
        tokens = torch.full((logits.shape[0],), token, dtype=torch.long)
        return tokens, torch.log_softmax(logits.float(), -1)[:, token]

    monkeypatch.setattr(gen_module, "sample_tokens", scripted)
    rl = RLConfig(num_generations=2, max_completion_length=200, focus_mode=mode, crop_size=56, max_views=2, beta=0.0)
    prompts = [build_prompt(toy_record(tmp_path, 0), processor, with_depth=rl.depth_in_prompt)]
    batch = generate_rollouts(model, processor, prompts, rl)

    assert len(batch.rollouts) == 2 and batch.texts == [SCRIPT, SCRIPT]
    prompt_images = 2 if mode == "crop" else 1  # crop mode shows the depth image in the prompt, text mode does not
    for r in batch.rollouts:
        assert r.finished
        assert int(r.completion_mask.sum()) == len(script)  # spliced vision tokens are never trained on
        views = 2 if mode == "crop" else 0  # the box's RGB crop and its depth crop
        assert r.image_grid_thw.shape[0] == prompt_images + views
        assert r.num_focus_steps == (1 if mode == "crop" else 0)
        if mode == "crop":
            assert r.image_grid_thw[-1].tolist() == [1, 4, 4]  # a 56 x 56 view = 4 x 4 patches of 14
            n_vision = int((r.input_ids == cfg.vision_start_token_id).sum())
            assert n_vision == prompt_images + views
    assert batch.num_views == (2 if mode == "crop" else 0)  # one box per sample

    rewards = score_completions(batch.texts, batch.prompt_index, [p.target for p in prompts])
    assert rewards.terms["format"].tolist() == [1.0, 1.0]
    assert rewards.terms["answer"].tolist() == [1.0, 1.0]
    assert rewards.terms["grounding"].tolist() == [1.0, 1.0]  # the scripted box is the record's gt box

    packed = pack_rollouts(batch.rollouts, cfg)
    adv = group_advantages(torch.tensor([1.0, 0.0]), 2)
    out = GRPOObjective(rl)(model, GRPOMicroBatch(packed, adv))
    out.loss_sum.backward()
    assert torch.isfinite(out.loss_sum)
    assert model.model.embed_tokens.weight.grad is not None


def test_crop_hook_fires_when_a_bpe_token_runs_past_the_area_tag(tmp_path: Path, monkeypatch) -> None:
    """A vocabulary where ``><`` is one token (as in Qwen's): ``</area>`` is completed mid-token, and the hook still
    crops that area once, reading the text only up to the tag."""
    tok = Tokenizer(build_bpe_tokenizer([SCRIPT] * 20, vocab_size=300))
    script = tok.encode(SCRIPT)
    assert "><" in [tok.decode([t]) for t in script]
    cfg = micro_config(tok)
    model = VLModel(cfg)
    init_weights(model, seed=0)
    processor = Processor(tok, ImageConfig(min_pixels=56 * 56, max_pixels=56 * 56))
    step = iter(range(10_000))

    def scripted(logits, temperature, top_p, generator, banned=()):  # both samples write SCRIPT
        token = script[next(step)]
        return torch.full((logits.shape[0],), token, dtype=torch.long), torch.zeros(logits.shape[0])

    monkeypatch.setattr(gen_module, "sample_tokens", scripted)
    rl = RLConfig(num_generations=2, max_completion_length=200, focus_mode="crop", crop_size=56, beta=0.0)
    prompts = [build_prompt(toy_record(tmp_path, 0), processor, with_depth=rl.depth_in_prompt)]
    batch = generate_rollouts(model, processor, prompts, rl)
    assert batch.texts == [SCRIPT, SCRIPT]
    assert [r.num_focus_steps for r in batch.rollouts] == [1, 1]
    assert batch.num_views == 2 and all(  # prompt RGB + depth, then the box's RGB + depth crops
        r.image_grid_thw.shape[0] == 2 + 2 for r in batch.rollouts
    )


AREA2 = '<area>[{"bbox_2d":[0.5,0.1,0.9,0.5],"depth":0.75}]</area>'
SCRIPTS = [
    SCRIPT,
    SCRIPT.replace("<text>the cube</text>", f"<text>the cube</text>{AREA2}<text>the ball</text>"),
    "<think><text>no box at all here</text></think><answer>B</answer>",
    SCRIPT.replace("<think>", "<think><text>first a longer look around</text>"),
]


class PerRowScript:
    """sample_tokens stand-in: live sample i (in generate's order) writes SCRIPTS[i % 4] token by token."""

    def __init__(self, scripts):
        self.scripts, self.live, self.pos = scripts, list(range(len(scripts))), [0] * len(scripts)

    def __call__(self, logits, temperature, top_p, generator, banned=()):
        assert logits.shape[0] == len(self.live)
        tokens = torch.tensor([self.scripts[i][self.pos[i]] for i in self.live])
        for i in self.live:
            self.pos[i] += 1
        self.live = [i for i in self.live if self.pos[i] < len(self.scripts[i])]
        return tokens, torch.log_softmax(logits.float(), -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def test_crop_mode_static_splices_equal_the_module_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Crop mode through generate_rollouts, rows splicing views at different steps (one row twice, one never) and
    finishing at different steps: the static path (splices by StaticDecodeStep.extend, finished rows compacted
    away) gives the module path's sequences, views and log-probs, and so does the static path one step ahead of
    the host (``graph_async``: the scripted sampler sees exactly the live rows at every step); the KV cache, sized
    with the view budget, is allocated once and never grows."""
    from engine.models.decoder import KVCache
    from engine.models.generate import DecodeEngine

    tok = Tokenizer(build_byte_tokenizer())
    cfg = micro_config(tok)
    model = VLModel(cfg)
    init_weights(model, seed=0)
    processor = Processor(tok, ImageConfig(min_pixels=56 * 56, max_pixels=56 * 56))
    scripts = [tok.encode(s) for s in SCRIPTS]
    grown, ensure = [], KVCache.ensure

    def spy(self, needed):
        if needed > self.capacity:
            grown.append(needed)
        return ensure(self, needed)

    monkeypatch.setattr(KVCache, "ensure", spy)
    prompts = [build_prompt(toy_record(tmp_path, i), processor, with_depth=True) for i in range(2)]
    out = {}
    for decode in ("eager", "static", "graph_async"):
        monkeypatch.setattr(gen_module, "sample_tokens", PerRowScript(scripts))
        rl = RLConfig(num_generations=2, max_completion_length=200, focus_mode="crop", crop_size=56, max_views=2,
                      beta=0.0, decode=decode)  # fmt: skip
        engine = DecodeEngine()
        out[decode] = (generate_rollouts(model, processor, prompts, rl, engine=engine), engine)
    eager = out["eager"][0]
    assert eager.texts == SCRIPTS
    for decode in ("static", "graph_async"):
        static = out[decode][0]
        assert static.texts == SCRIPTS
        assert [r.num_focus_steps for r in static.rollouts] == [1, 2, 0, 1]
        assert static.num_views == eager.num_views == 4  # boxes (each an RGB and a depth view)
        for a, b in zip(eager.rollouts, static.rollouts):
            assert a.input_ids.tolist() == b.input_ids.tolist()
            torch.testing.assert_close(a.image_grid_thw, b.image_grid_thw)
            torch.testing.assert_close(a.pixel_values, b.pixel_values)
            torch.testing.assert_close(a.logprobs, b.logprobs, atol=1e-5, rtol=0)
        stats = out[decode][1].stats
        assert stats["splice_steps"] >= 2 and stats["compactions"] >= 1 and not grown
        assert static.metrics()["rollout/decode_rows"] < 4
