"""The before/after probe: scores equal the reward functions' on the same rollouts, and repeat exactly."""

import importlib
from pathlib import Path

import pytest
import torch
from _toys import SCRIPT, micro_config, toy_record

from engine.models import ImageConfig, Processor, Tokenizer, VLModel
from engine.models.tiny import init_weights
from engine.models.tokenizer import build_byte_tokenizer
from engine.rl.grpo import RLConfig
from engine.rl.probe import PROBE_KEYS, probe_rewards
from engine.rl.prompts import build_prompt
from engine.rl.rewards import score_completions
from engine.rl.rollout import generate_rollouts

gen_module = importlib.import_module("engine.models.generate")


def _setup(tmp_path: Path, num_prompts: int):
    tok = Tokenizer(build_byte_tokenizer())
    model = VLModel(micro_config(tok))
    init_weights(model, seed=0)
    processor = Processor(tok, ImageConfig(min_pixels=56 * 56, max_pixels=56 * 56))
    prompts = [build_prompt(toy_record(tmp_path, i), processor, with_depth=False) for i in range(num_prompts)]
    return tok, model.eval(), processor, prompts


def test_probe_of_scripted_policy_scores_every_term(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every sample writes SCRIPT (right answer, the gt box): format, answer and grounding are 1 for all 3 x 2."""
    tok, model, processor, prompts = _setup(tmp_path, 3)
    script = tok.encode(SCRIPT)
    position: dict[torch.Generator, int] = {}  # keyed by the object: ids of freed generators get reused

    def scripted(logits, temperature, top_p, generator, banned=()):
        step = position.setdefault(generator, 0)  # each generate call (own generator) restarts the script
        position[generator] = step + 1
        tokens = torch.full((logits.shape[0],), script[step], dtype=torch.long)
        return tokens, torch.log_softmax(logits.float(), -1)[:, script[step]]

    monkeypatch.setattr(gen_module, "sample_tokens", scripted)
    rl = RLConfig(num_generations=2, max_completion_length=200, beta=0.0)
    result = probe_rewards(model, processor, prompts, rl, seed=0, prompts_per_call=2)  # chunks of 2 and 1
    depth = score_completions([SCRIPT], [0], [prompts[0].target]).terms["depth"].item()
    assert set(result) == set(PROBE_KEYS)
    for key in ("format", "answer", "grounding", "accuracy"):
        assert result[f"reward/{key}"] == 1.0
    assert result["reward/depth"] == pytest.approx(depth)
    assert result["reward/total"] == pytest.approx(3.0 + depth)


def test_probe_repeats_exactly_and_matches_the_rewards(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each sample draws its answer (A right, B wrong) from the probe's generator: two probes agree exactly, and
    equal the rewards of rollouts generated with the probe's documented per-chunk seeds."""
    tok, model, processor, prompts = _setup(tmp_path, 2)
    scripts = torch.tensor([tok.encode(SCRIPT), tok.encode(SCRIPT.replace(">A<", ">B<"))])
    state: dict[torch.Generator, tuple[int, torch.Tensor]] = {}

    def coin_flip(logits, temperature, top_p, generator, banned=()):
        step, choice = state.get(generator, (0, None))
        if choice is None:
            choice = (torch.rand(logits.shape[0], generator=generator) < 0.5).long()
        state[generator] = (step + 1, choice)
        tokens = scripts[choice, step]
        return tokens, torch.log_softmax(logits.float(), -1).gather(1, tokens[:, None])[:, 0]

    monkeypatch.setattr(gen_module, "sample_tokens", coin_flip)
    rl = RLConfig(num_generations=4, max_completion_length=200, beta=0.0)
    first = probe_rewards(model, processor, prompts, rl, seed=5, prompts_per_call=1)
    assert probe_rewards(model, processor, prompts, rl, seed=5, prompts_per_call=1) == first
    assert 0.0 < first["reward/answer"] < 1.0  # both answers were drawn

    terms: dict[str, list[float]] = {key: [] for key in PROBE_KEYS}
    for c, prompt in enumerate(prompts):  # rank 0 of 1 scores every prompt, one chunk each
        generator = torch.Generator().manual_seed((5 * 65_537 + 0) * 1_000_003 + c)
        batch = generate_rollouts(model, processor, [prompt], rl, generator=generator)
        rewards = score_completions(batch.texts, batch.prompt_index, [prompt.target])
        for key, values in rewards.per_sample().items():
            terms[key] += values.tolist()
    for key in PROBE_KEYS:
        assert first[key] == pytest.approx(sum(terms[key]) / len(terms[key])), key
