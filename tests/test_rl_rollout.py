"""Crop-mode rollouts end to end: a scripted policy names a box, the hook's crops are spliced in as views, the
rollout scores and packs, and the GRPO objective runs over the spliced sequence."""

import importlib
from pathlib import Path

import pytest
import torch
from test_rl_grpo import micro_config
from test_sft import _record

from engine.models import ImageConfig, Processor, Tokenizer, VLModel
from engine.models.tiny import init_weights
from engine.models.tokenizer import build_bpe_tokenizer, build_byte_tokenizer
from engine.rl.advantages import group_advantages
from engine.rl.grpo import GRPOMicroBatch, GRPOObjective, RLConfig
from engine.rl.packing import pack_rollouts
from engine.rl.prompts import build_prompt
from engine.rl.rewards import score_completions
from engine.rl.rollout import generate_rollouts

gen_module = importlib.import_module("engine.models.generate")  # the module (the package re-exports the function)

SCRIPT = (
    '<think><area>[{"bbox_2d":[0.1,0.2,0.4,0.6],"depth":0.25}]</area><text>the cube</text></think><answer>A</answer>'
)


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
    prompts = [build_prompt(_record(tmp_path, 0), processor, with_depth=rl.depth_in_prompt)]
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
    prompts = [build_prompt(_record(tmp_path, 0), processor, with_depth=rl.depth_in_prompt)]
    batch = generate_rollouts(model, processor, prompts, rl)
    assert batch.texts == [SCRIPT, SCRIPT]
    assert [r.num_focus_steps for r in batch.rollouts] == [1, 1]
    assert batch.num_views == 2 and all(  # prompt RGB + depth, then the box's RGB + depth crops
        r.image_grid_thw.shape[0] == 2 + 2 for r in batch.rollouts
    )
