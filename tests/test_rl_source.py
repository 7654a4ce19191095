"""The GRPO batch source: the rollout batch decoupled from the update batch (rl.rollout_prompts_per_rank)."""

import copy

import pytest
import torch
from _toys import micro_config, toy_record

import engine.rl.step as source_module
from engine.config import LoRAConfig, TrainConfig
from engine.distributed import init_distributed
from engine.models import ImageConfig, Processor, Tokenizer, VLModel
from engine.models.tiny import init_weights
from engine.models.tokenizer import build_byte_tokenizer
from engine.rl.grpo import GRPOObjective, RLConfig, rollout_logprobs
from engine.rl.source import GRPOBatchSource
from engine.train.batch_source import StepContext
from engine.train.lora import apply_lora, lora_modules
from engine.train.metrics import PhaseTimer
from engine.train.trainer import Trainer


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("records")
    tok = Tokenizer(build_byte_tokenizer())
    cfg = micro_config(tok)
    model = VLModel(cfg)
    init_weights(model, seed=0, std=0.2)
    apply_lora(model, LoRAConfig(rank=4, alpha=8, dropout=0.1))  # dropout: rollouts must still be the policy's
    with torch.no_grad():
        for _, m in lora_modules(model):
            m.lora_B.normal_(0, 0.2, generator=torch.Generator().manual_seed(1))
    processor = Processor(tok, ImageConfig(min_pixels=56 * 56, max_pixels=56 * 56))
    records = [toy_record(tmp, i) for i in range(8)]
    return model, processor, cfg, records


@pytest.fixture
def fixed_advantages(monkeypatch):
    """Random policies score 0 everywhere (zero advantages, zero policy gradient): use fixed non-zero ones."""

    def advantages(rewards, group, scale_by_std=True):
        return torch.linspace(-1.0, 1.0, len(rewards))

    monkeypatch.setattr(source_module, "group_advantages", advantages)


def _rl(**kw):
    base = dict(num_generations=2, max_completion_length=12, beta=0.04, decode="static")
    return RLConfig(**{**base, **kw})


def _source(tiny, rl, micro, accum):
    model, processor, cfg, records = tiny
    return GRPOBatchSource(
        records, processor, cfg, rl, micro_batch_size=micro, grad_accum_steps=accum, seed=0, shuffle=False
    )


def _ctx(model, step):
    return StepContext(model, step, 0, 1, torch.device("cpu"), PhaseTimer(), metrics={})


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
def test_a_rollout_split_into_micro_batches_has_the_all_at_once_gradient(tiny, fixed_advantages, tmp_path, loss_type):
    """One rollout of P = 4 prompts (x G = 2), consumed as 4 x 1, 2 x 2 or 1 x 4 prompts per micro-batch: the
    Trainer's normalisation (by the step's global loss units: sequences for grpo / dr_grpo, tokens for bnpo /
    dapo) makes every split's gradient the all-at-once gradient, for every loss type. (Adapter dropout off: the
    update's dropout masks would differ between splits.)"""
    rl = _rl(loss_type=loss_type)
    grads = {}
    with init_distributed("cpu") as env:
        for micro, accum in ((1, 4), (2, 2), (4, 1)):
            model = copy.deepcopy(tiny[0])
            for _, m in lora_modules(model):
                m.lora_dropout = torch.nn.Identity()
            source = _source(tiny, rl, micro, accum)
            train = TrainConfig(
                output_dir=str(tmp_path), run_name=f"r{micro}", micro_batch_size=micro, grad_accum_steps=accum,
                progress_bar=False, export_hf=False, max_steps=1,
            )  # fmt: skip
            trainer = Trainer(model, GRPOObjective(rl), source, train, env=env, phase="grpo")
            batches = source.next_step(_ctx(trainer.model, 0))
            assert len(batches) == accum and all(b.packed.num_sequences == micro * 2 for b in batches)
            trainer.compute_gradients(batches)
            params = trainer.model.named_parameters()
            grads[micro] = {n: p.grad.full_tensor().clone() for n, p in params if p.grad is not None}
            texts = source.last_batch.texts
            if micro == 1:
                reference_texts = texts
            assert texts == reference_texts  # the same rollout whatever the split
    assert grads[1] and any(float(g.abs().max()) > 0 for g in grads[1].values())
    for micro in (2, 4):
        for name, g in grads[1].items():
            torch.testing.assert_close(grads[micro][name], g, rtol=1e-4, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")


def test_one_rollout_feeds_several_optimiser_steps(tiny, monkeypatch):
    """rl.rollout_prompts_per_rank = 4 with 1 x 2 prompts per step: one generate call of 4 prompts (8 rows) feeds two
    steps, which see the prompts two default steps would see, in order. The second step runs after an update, so
    its micro-batches carry the rollout policy's log-probs (old_logp), equal to the sampling log-probs (rollouts
    sample in eval mode); the first needs none. A checkpoint between the two steps resumes with the second slice
    (the rollout regenerated), not with the next prompts."""
    model = tiny[0]
    calls = []
    generate_rollouts = source_module.generate_rollouts

    def spy(model, processor, prompts, cfg, **kw):
        calls.append([p.record.id for p in prompts])
        return generate_rollouts(model, processor, prompts, cfg, **kw)

    monkeypatch.setattr(source_module, "generate_rollouts", spy)
    default = _source(tiny, _rl(), 1, 2)
    default_ids = [calls[-1] for step in range(2) if default.next_step(_ctx(model, step)) is not None]
    assert len(calls) == 2 and all(len(ids) == 2 for ids in default_ids)
    calls.clear()

    source = _source(tiny, _rl(rollout_prompts_per_rank=4), 1, 2)
    assert source.steps_per_epoch == default.steps_per_epoch
    first = source.next_step(_ctx(model, 0))
    state = source.state_dict()
    second = source.next_step(_ctx(model, 1))
    assert calls == [default_ids[0] + default_ids[1]]  # one rollout for both steps
    assert len(first) == len(second) == 2 and all(mb.packed.num_sequences == 2 for mb in first + second)
    assert all(mb.old_logp is None for mb in first) and all(mb.old_logp is not None for mb in second)
    sampled = [r.logprobs[r.completion_mask] for r in source.last_batch.rollouts[4:]]
    for k, mb in enumerate(second):
        mask = mb.packed.mask
        for row in range(2):
            torch.testing.assert_close(mb.old_logp[row][mask[row]], sampled[2 * k + row], atol=1e-4, rtol=0)
    assert state["rollout_steps_done"] == 1 and "rollout_steps_done" not in source.state_dict()

    calls.clear()
    resumed = _source(tiny, _rl(rollout_prompts_per_rank=4), 1, 2)
    resumed.load_state_dict(state)
    again = resumed.next_step(_ctx(model, 1))
    assert calls == [default_ids[0] + default_ids[1]] and len(again) == 2  # regenerated, then the second slice
    assert [mb.old_logp is not None for mb in again] == [True, True]
    resumed.next_step(_ctx(model, 2))
    assert len(calls) == 2 and calls[1] != calls[0]  # then the next rollout


def test_rollout_prompts_must_be_a_multiple_of_a_step(tiny):
    with pytest.raises(ValueError, match="multiple of the prompts of one optimiser step"):
        _source(tiny, _rl(rollout_prompts_per_rank=3), 1, 2)
    with pytest.raises(ValueError, match="rollout_prompts_per_rank must be >= 0"):
        _rl(rollout_prompts_per_rank=-1)


def test_the_source_keeps_one_decode_engine(tiny):
    """The static step and the KV cache are built once for the run (one DecodeEngine per source)."""
    model = tiny[0]
    source = _source(tiny, _rl(), 1, 1)
    source.next_step(_ctx(model, 0))
    step, cache = source.engine.step, source.engine.cache
    source.next_step(_ctx(model, 1))
    assert source.engine.num_builds == 1 and source.engine.step is step and source.engine.cache is cache
    released = _source(tiny, _rl(keep_kv_cache=False), 1, 1)
    released.next_step(_ctx(model, 0))
    assert released.engine.cache is None and released.engine.step is not None
    assert rollout_logprobs  # imported for the old-log-prob check above


def test_grpo_step_is_the_default_loop_step(tiny, fixed_advantages, tmp_path):
    """``engine.rl.step.grpo_step`` (the recipe's step function) runs the same optimiser steps as the Trainer's
    generic step over the same batch source: the same losses, gradient norms, reward figures and metrics keys, over
    a rollout that feeds two steps (the second with old log-probs) and the next rollout."""
    from engine.rl.step import grpo_step

    rl = _rl(rollout_prompts_per_rank=2)
    records = {}
    with init_distributed("cpu") as env:
        for name, step_fn in (("generic", None), ("grpo_step", grpo_step)):
            train = TrainConfig(
                output_dir=str(tmp_path), run_name=name, lr=1e-2, progress_bar=False, export_hf=False, max_steps=3,
            )  # fmt: skip
            source = _source(tiny, rl, 1, 1)
            trainer = Trainer(copy.deepcopy(tiny[0]), GRPOObjective(rl), source, train, env=env, phase="grpo",
                              step_fn=step_fn)  # fmt: skip
            records[name] = [trainer.train_step() for _ in range(3)]
    for generic, ours in zip(records["generic"], records["grpo_step"]):
        assert set(generic) == set(ours)
        for key in ("loss", "grad_norm", "lr", "num_loss_tokens", "reward/total", "reward/format", "kl"):
            assert ours[key] == pytest.approx(generic[key], rel=1e-5, abs=1e-7), key
    assert [("time/rollout" in r) for r in records["grpo_step"]] == [True, False, True]
    assert len({r["loss"] for r in records["grpo_step"]}) > 1
