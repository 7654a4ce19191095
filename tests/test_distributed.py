"""FSDP2 on 2 gloo processes: sharded gradients equal one process's; unsharded inference; cross-rank checks."""

import copy
import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from _toys import ToyVLM, collate, make_dataset, run_distributed, token_ce_objective

from engine.config import LoRAConfig, TrainConfig
from engine.distributed import fsdp_modules, init_distributed, parallelize, unsharded
from engine.models import (
    VLModel,
    create_tiny_checkpoint,
    from_pretrained,
    generate,
    mrope_position_ids,
    processor_from_pretrained,
    tiny_config,
)
from engine.models.packing import pack_rollouts, target_logprobs
from engine.models.tiny import init_weights
from engine.train import IndexedBatchSource, ObjectiveOutput, Trainer, export_hf, mean_across_ranks
from engine.train.lora import apply_lora


def _reference_grads(model, items, micro_batch_size):
    """One process, no sharding: gradient of (sum of all masked token losses) / (their count)."""
    loss_sum, count = 0.0, 0
    for i in range(0, len(items), micro_batch_size):
        out = token_ce_objective(model, collate(items[i : i + micro_batch_size]))
        loss_sum, count = loss_sum + out.loss_sum, count + int(out.num_loss_units)
    (loss_sum / count).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads.values()])).item()
    return grads, (loss_sum / count).item(), norm


def _sharded_grads_worker(env, out_dir):
    items = make_dataset(8)  # one global step: 2 ranks x 2 micro-batches x 2 items, 23 loss tokens, uneven per rank
    variants = [
        {"ac": False, "lora": False, "clip": 0.0},
        {"ac": True, "lora": False, "clip": 1e-3},
        {"ac": True, "lora": True, "clip": 0.0},
    ]
    for variant in variants:
        ref = ToyVLM(seed=5)
        if variant["lora"]:
            apply_lora(ref, LoRAConfig(enabled=True, rank=2, alpha=4, target_modules=("up_proj", "lm_head")))
            with torch.no_grad():
                for name, param in ref.named_parameters():
                    if name.endswith("lora_B"):
                        param.copy_(torch.linspace(-0.5, 0.5, param.numel()).view_as(param))
        model = copy.deepcopy(ref)
        ref_grads, ref_loss, ref_norm = _reference_grads(ref, items, micro_batch_size=2)
        cfg = TrainConfig(
            output_dir=str(out_dir), max_steps=1, grad_clip=variant["clip"], activation_checkpointing=variant["ac"]
        )
        source = IndexedBatchSource(
            items, micro_batch_size=2, grad_accum_steps=2, rank=env.rank, world_size=2, shuffle=False, collate=collate
        )
        trainer = Trainer(model, token_ce_objective, source, cfg, env=env)
        stats = trainer.compute_gradients(source.next_step())
        assert stats.num_loss_units == sum(int(it["mask"].sum()) for it in items)
        assert stats.loss == pytest.approx(ref_loss, rel=1e-6), (variant, stats, ref_loss)
        assert stats.grad_norm == pytest.approx(ref_norm, rel=1e-5)
        factor = min(1.0, variant["clip"] / ref_norm) if variant["clip"] > 0 else 1.0
        seen = set()
        for name, param in trainer.model.named_parameters():
            if not param.requires_grad:
                assert param.grad is None, name
                continue
            full = param.grad.full_tensor()
            torch.testing.assert_close(full, ref_grads[name] * factor, rtol=1e-5, atol=1e-7, msg=f"{variant} {name}")
            seen.add(name)
        assert seen == set(ref_grads)

    # Gathered inference: ranks run different numbers of forwards without collectives, outputs match.
    ref = ToyVLM(seed=5).eval()
    model = Trainer(copy.deepcopy(ref), token_ce_objective, source, cfg, env=env).model.eval()
    ids, image = torch.randint(0, 32, (1, 4)), torch.randn(1, 4)
    with torch.no_grad(), unsharded(model):
        for _ in range(3 if env.rank == 0 else 1):
            torch.testing.assert_close(model(ids, image), ref(ids, image))
    torch.testing.assert_close(model(ids, image), ref(ids, image))  # normal sharded forward afterwards

    # Different micro-batch counts on the ranks: a clear error on every rank, not a hang.
    with pytest.raises(RuntimeError, match="same non-zero number"):
        trainer.compute_gradients(source.next_step()[: 2 - env.rank])

    # Metrics with rank-dependent key sets are averaged over the ranks that report them.
    local = {"a": 1.0 + 2 * env.rank, **({"b": 5.0} if env.rank == 0 else {})}
    assert mean_across_ranks(local, env.device) == {"a": 2.0, "b": 5.0}
    assert mean_across_ranks({"a": float(env.rank), "c": 1.0}, env.device) == {"a": 0.5, "c": 1.0}


def _vlm_batch(config, seed):
    """Two packed sequences, the second with one 4x4-patch image (4 merged tokens); loss on a subset of tokens."""
    gen = torch.Generator().manual_seed(seed)
    text = lambda n: torch.randint(0, 200, (n,), generator=gen)  # noqa: E731
    image = torch.tensor([config.vision_start_token_id] + [config.image_token_id] * 4 + [config.vision_end_token_id])
    grid = torch.tensor([[1, 4, 4]])
    seqs = [(text(7 + seed % 3), None), (torch.cat([text(3), image, text(5)]), grid)]
    ids = torch.cat([s for s, _ in seqs])
    positions = torch.cat([mrope_position_ids(s, g, config) for s, g in seqs], dim=1)
    cu = torch.tensor([0, len(seqs[0][0]), len(ids)], dtype=torch.int32)
    pixels = torch.randn(16, 3 * 2 * 14 * 14, generator=gen)
    mask = torch.rand(len(ids) - 1, generator=gen) < 0.6
    return {"ids": ids, "pos": positions, "cu": cu, "pixels": pixels, "grid": grid, "mask": mask}


def vlm_objective(model, batch):
    """Next-token CE from hidden states, with the LM head applied after the forward (as the fused kernels do)."""
    hidden = model(batch["ids"], batch["pos"], batch["cu"], batch["pixels"], batch["grid"])
    logits = F.linear(hidden[:-1], model.lm_head_weight)
    losses = F.cross_entropy(logits, batch["ids"][1:], reduction="none")
    return ObjectiveOutput((losses * batch["mask"]).sum(), batch["mask"].sum())


def _vlm_worker(env, out_dir):
    """The real model: blocks, vision blocks, vision tower and root sharded; gradients equal one process's."""
    config = tiny_config()
    ref = VLModel(config)
    init_weights(ref, seed=0)  # VLModel(config) alone leaves some parameters uninitialised
    model = copy.deepcopy(ref)
    batches = [_vlm_batch(config, seed) for seed in range(4)]  # rank r takes batches 2r, 2r+1
    total = sum(int(b["mask"].sum()) for b in batches)
    (sum(vlm_objective(ref, b).loss_sum for b in batches) / total).backward()
    cfg = TrainConfig(output_dir=str(out_dir), max_steps=1, grad_clip=0.0, activation_checkpointing=True)
    trainer = Trainer(
        model, vlm_objective, IndexedBatchSource(batches, micro_batch_size=1, grad_accum_steps=1), cfg, env=env
    )
    units = [type(m).__name__ for m in fsdp_modules(trainer.model)]
    assert units.count("FSDPDecoderLayer") == 4 and units.count("FSDPVisionBlock") == 4, units
    assert "FSDPVisionTower" in units and "FSDPVLModel" in units
    trainer.compute_gradients(batches[2 * env.rank : 2 * env.rank + 2])
    ref_grads = {n: p.grad for n, p in ref.named_parameters()}
    for name, param in trainer.model.named_parameters():
        got, want = param.grad.full_tensor(), ref_grads[name]
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")
    with torch.no_grad():  # entry points other than __call__ gather the root's parameters too
        ids = batches[0]["ids"][None, :7]
        torch.testing.assert_close(trainer.model.logits(ids), ref.logits(ids), rtol=1e-5, atol=1e-5)
    # HF export (config.json + hub names) loads back: as stored (fp32) exactly, and in bf16 by default.
    export_hf(trainer.model, out_dir / "hf", env=env, dtype=None)
    export_hf(trainer.model, out_dir / "hf16", env=env)
    if env.is_main:
        loaded = from_pretrained(out_dir / "hf")
        half = from_pretrained(out_dir / "hf16")
        triples = zip(ref.named_parameters(), loaded.named_parameters(), half.named_parameters())
        for (name, p), (_, q), (_, h) in triples:
            assert torch.equal(p, q), name
            assert h.dtype == torch.bfloat16 and torch.equal(p.to(torch.bfloat16), h), name


def _all_workers(env, out_dir):
    _sharded_grads_worker(env, out_dir)
    _vlm_worker(env, out_dir)


def test_fsdp2_sharded_gradients_equal_single_process(tmp_path):
    """Toy model (plain, activation-checkpointed + clipped, LoRA) and the real tiny VLModel, on 2 processes."""
    run_distributed(_all_workers, 2, tmp_path)


def _generate_then_train_worker(env, out_dir):
    """A freshly sharded model generates first (the vision tower runs before any root forward, no warm-up), then
    trains on its rollouts through the packed objective, whose head weight is read after the forward: rollouts,
    log-probs and gradients equal one process's, for a tied and an untied head."""
    proc = processor_from_pretrained(create_tiny_checkpoint(out_dir / f"tiny-{env.rank}", seed=0))
    gen = torch.Generator().manual_seed(3)
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Where?"}]}]
    images = [torch.randint(0, 256, (56, 84, 3), dtype=torch.uint8, generator=gen) for _ in range(2)]
    prompts = [proc.apply_chat_template(msgs, [im], add_generation_prompt=True) for im in images]
    for tie in (True, False):
        config = dataclasses.replace(tiny_config(), tie_word_embeddings=tie)
        ref = VLModel(config)
        init_weights(ref, seed=0)
        model = parallelize(copy.deepcopy(ref), env.mesh)
        with torch.no_grad(), unsharded(model):
            rollouts = generate(model, proc, prompts[env.rank : env.rank + 1], 2, 5, temperature=0.0)
        with torch.no_grad():
            ref_rollouts = generate(ref, proc, prompts, 2, 5, temperature=0.0)
        for r, want in zip(rollouts, ref_rollouts[2 * env.rank : 2 * env.rank + 2]):
            assert torch.equal(r.input_ids, want.input_ids), (tie, r.text, want.text)
        logp = target_logprobs(model, pack_rollouts(rollouts, config))
        ref_logp = [target_logprobs(ref, pack_rollouts(ref_rollouts[k : k + 2], config)) for k in (0, 2)]
        torch.testing.assert_close(logp, ref_logp[env.rank], rtol=1e-5, atol=1e-5)
        (-logp.sum()).backward()  # FSDP2 averages the ranks' gradients
        (-(ref_logp[0].sum() + ref_logp[1].sum()) / 2).backward()
        ref_grads = {n: p.grad for n, p in ref.named_parameters()}
        for name, param in model.named_parameters():
            got, want = param.grad.full_tensor(), ref_grads[name]
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6, msg=lambda m, n=name, t=tie: f"{t} {n}: {m}")


def test_fsdp2_generates_without_warmup_and_head_gradients_match(tmp_path):
    """Generation straight after parallelize(), then the head weight used outside the forward, on 2 processes."""
    run_distributed(_generate_then_train_worker, 2, tmp_path)


@pytest.mark.gpu
def test_cuda_bf16_compute_with_fp32_master_weights_and_grads(tmp_path):
    """On CUDA: parameters all-gathered in bf16 for compute, sharded fp32 masters and fp32 gradients, fused AdamW."""
    with init_distributed("cuda") as env:
        items = [{k: v.cuda() for k, v in item.items()} for item in make_dataset(4)]
        source = IndexedBatchSource(items, micro_batch_size=2, grad_accum_steps=2, collate=collate)
        cfg = TrainConfig(output_dir=str(tmp_path), max_steps=1, progress_bar=False)
        trainer = Trainer(ToyVLM(), token_ce_objective, source, cfg, env=env)
        batch = collate(items[:2])
        with torch.no_grad():
            assert trainer.model(batch["ids"], batch["image"]).dtype == torch.bfloat16
        stats = trainer.compute_gradients(source.next_step())
        assert math.isfinite(stats.loss) and stats.grad_norm > 0
        for name, param in trainer.model.named_parameters():
            assert param.dtype == torch.float32 and param.grad.dtype == torch.float32, name
            assert param.device.type == "cuda", name
        assert trainer.optimizer.defaults["fused"] is True
