"""Loading, reference, export and HSDP at scale, rehearsed on gloo: every rank reads only its shards' slices, the
full-fine-tuning reference shares nothing with the policy, the export streams bf16 HF shards that transformers
loads, and a 2 x 2 HSDP mesh trains exactly as one process."""

import json
import math

import pytest
import torch
from _toys import ToyVLM, collate, make_dataset, run_distributed, token_ce_objective
from safetensors import safe_open
from torch.distributed.tensor import DTensor, Replicate, Shard

from engine.config import LoRAConfig, ModelSection, TrainConfig
from engine.models import create_tiny_checkpoint, from_pretrained, save_pretrained
from engine.models.loading import engine_name
from engine.train import IndexedBatchSource, Trainer, export_hf
from engine.train.lora import apply_lora, lora_modules, merge_and_unload
from engine.train.sharded import build_sharded_model

LORA = LoRAConfig(enabled=True, rank=4, alpha=8.0, target_modules=("q_proj", "v_proj", "up_proj", "down_proj"))


@pytest.fixture(scope="module")
def sharded_checkpoint(tmp_path_factory):
    """The tiny model written in HF's sharded layout (several files + model.safetensors.index.json)."""
    root = tmp_path_factory.mktemp("scale")
    tiny = create_tiny_checkpoint(root / "tiny", seed=0)
    save_pretrained(from_pretrained(tiny), root / "sharded", max_shard_bytes=2_000_000)
    for name in ("tokenizer.json", "preprocessor_config.json"):
        (root / "sharded" / name).write_bytes((tiny / name).read_bytes())
    assert len(json.loads((root / "sharded" / "model.safetensors.index.json").read_text())["weight_map"]) > 10
    return root / "sharded"


def _load_worker(env, path, out):
    # LoRA on a bf16 frozen base: every rank reads a disjoint part of the files, and the shards (adapters included)
    # equal the unsharded model with apply_lora.
    model, stats = build_sharded_model(path, env.mesh, env.device, lora=LORA, frozen_dtype=torch.bfloat16, seed=7)
    ref = from_pretrained(path, dtype=torch.float32)
    apply_lora(ref, LORA, seed=7)
    for (name, p), (ref_name, q) in zip(model.named_parameters(), ref.named_parameters()):
        assert name == ref_name and isinstance(p, DTensor) and p.placements == (Shard(0),)
        want = q.detach() if p.requires_grad else q.detach().to(torch.bfloat16)
        assert p.dtype == (torch.float32 if p.requires_grad else torch.bfloat16), name
        assert torch.equal(p.full_tensor(), want), name
    assert not model.training and len(lora_modules(model)) == 4 * len(model.model.layers)
    reads = [None] * env.world_size
    torch.distributed.all_gather_object(reads, (stats.bytes_read, stats.checkpoint_bytes))
    if env.is_main:
        (out / "reads.json").write_text(json.dumps(reads))

    # Full fine-tuning and its reference: own shards, bf16, nothing shared, unaffected by the policy's updates.
    from engine.recipes.policy import frozen_copy

    policy, _ = build_sharded_model(path, env.mesh, env.device, freeze_vision=True)
    reference = frozen_copy(policy, env, ModelSection(dtype="bfloat16"))
    policy_storage = {p.to_local().untyped_storage().data_ptr() for p in policy.parameters()}
    ref_bytes = 0
    for (name, p), (_, r) in zip(policy.named_parameters(), reference.named_parameters()):
        assert r.dtype == torch.bfloat16 and not r.requires_grad and isinstance(r, DTensor), name
        assert r.to_local().untyped_storage().data_ptr() not in policy_storage, name
        assert torch.equal(r.full_tensor(), p.full_tensor().to(torch.bfloat16)), name
        ref_bytes += r.to_local().numel() * 2
    total = sum(p.numel() for p in policy.parameters())
    assert ref_bytes <= 2 * (total / env.world_size + 4096), "the reference costs its bf16 shards"
    with torch.no_grad():
        before = {n: r.full_tensor().clone() for n, r in reference.named_parameters()}
        for p in policy.parameters():
            if p.requires_grad:
                p.to_local().add_(1.0)
        for n, r in reference.named_parameters():
            assert torch.equal(r.full_tensor(), before[n]), n


def test_sharded_load_reads_only_own_slices_and_reference_shares_nothing(sharded_checkpoint, tmp_path):
    """3 ranks (uneven split) on an index-sharded checkpoint: LoRA base in bf16, adapters drawn as apply_lora draws
    them, each rank reading its own third; the full-fine-tuning reference costs exactly its own bf16 shards."""
    run_distributed(_load_worker, 3, sharded_checkpoint, tmp_path)
    reads = json.loads((tmp_path / "reads.json").read_text())
    total = reads[0][1]
    assert sum(r for r, _ in reads) == total  # every byte read once, by one rank
    for read, _ in reads:
        assert 0.25 * total < read < 0.42 * total  # about a third each


def _export_worker(env, path, out):
    model, _ = build_sharded_model(path, env.mesh, env.device, lora=LORA, seed=1)
    with torch.no_grad():  # non-zero adapters, so that the merge matters
        for name, module in lora_modules(model):
            b = module.lora_B.to_local()
            b.copy_(torch.linspace(-0.3, 0.3, b.numel()).view_as(b) * (1 + len(name) % 3))
    gathered: list[int] = []
    original = DTensor.full_tensor

    def spy(self, *args, **kwargs):
        gathered.append(self.numel())
        return original(self, *args, **kwargs)

    DTensor.full_tensor = spy
    try:
        export_hf(model, out / "hf", env=env, max_shard_bytes=1_500_000, write_extra=lambda d: (d / "extra").touch())
    finally:
        DTensor.full_tensor = original
    largest = max(p.numel() for p in model.parameters())
    assert max(gathered) <= largest  # one parameter at a time, never the whole model
    state = {n: p.full_tensor() for n, p in model.named_parameters()}
    if env.is_main:
        ref = from_pretrained(path)
        apply_lora(ref, LORA, seed=1)
        ref.load_state_dict(state)
        torch.save({k: v.to(torch.bfloat16) for k, v in merge_and_unload(ref).state_dict().items()}, out / "merged.pt")


def test_streaming_export_is_sharded_bf16_and_transformers_loads_it(sharded_checkpoint, tmp_path):
    """2 ranks, LoRA with non-zero adapters: model-0000i-of-0000N files + index in bf16, merged per layer, equal to
    the unsharded merge, loadable by our from_pretrained and by transformers (same tensors, same logits)."""
    transformers = pytest.importorskip("transformers", minversion="5.0")
    assert TrainConfig().export_dtype == "bfloat16"
    run_distributed(_export_worker, 2, sharded_checkpoint, tmp_path)
    hf_dir = tmp_path / "hf"
    index = json.loads((hf_dir / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 2 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    assert (hf_dir / "extra").is_file()
    assert json.loads((hf_dir / "config.json").read_text())["torch_dtype"] == "bfloat16"
    size = 0
    for f in files:
        with safe_open(str(hf_dir / f), "pt") as h:
            for k in h.keys():
                t = h.get_tensor(k)
                assert t.dtype == torch.bfloat16 and index["weight_map"][k] == f, k
                size += t.numel() * 2
    assert index["metadata"]["total_size"] == size
    merged = torch.load(tmp_path / "merged.pt")
    ours = from_pretrained(hf_dir)
    assert {n for n, _ in ours.named_parameters()} == set(merged)
    for name, p in ours.named_parameters():
        assert torch.equal(p, merged[name]), name
    hf = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(hf_dir, dtype=torch.float32).eval()
    hf_state = hf.state_dict()
    for key, value in hf_state.items():
        name = engine_name(key)
        if name in merged:
            assert torch.equal(value, merged[name].float()), key
    ours32 = from_pretrained(hf_dir, dtype=torch.float32)
    ids = torch.randint(0, 400, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = hf(input_ids=ids, mm_token_type_ids=torch.zeros_like(ids)).logits
        torch.testing.assert_close(ours32.logits(ids), want, atol=1e-4, rtol=0)


def _hsdp_worker(env, out, path):
    # the sharded load on the 2-D mesh: each rank reads its half (its shard group's), replicas read the same half
    model, stats = build_sharded_model(path, env.data_parallel_mesh(2), env.device, lora=LORA, seed=3)
    ref = from_pretrained(path)
    apply_lora(ref, LORA, seed=3)
    for (name, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
        assert p.placements == (Replicate(), Shard(0)) and torch.equal(p.full_tensor(), q), name
    assert 0.4 * stats.checkpoint_bytes < stats.bytes_read < 0.6 * stats.checkpoint_bytes
    del model
    cfg = TrainConfig(output_dir=str(out), max_steps=3, lr=5e-2, dp_replicate=2, progress_bar=False, plot=False,
                      export_hf=False, seed=4, grad_clip=0.5)  # fmt: skip
    mesh = env.data_parallel_mesh(2)
    assert mesh.mesh_dim_names == ("dp_replicate", "dp_shard") and tuple(mesh.shape) == (2, 2)
    assert env.data_parallel_mesh(0) is env.mesh  # one "node" here (LOCAL_WORLD_SIZE unset)
    source = IndexedBatchSource(make_dataset(24), micro_batch_size=2, grad_accum_steps=1, rank=env.rank, world_size=4,
                                collate=collate, shuffle=False)  # fmt: skip
    trainer = Trainer(ToyVLM(seed=2), token_ce_objective, source, cfg, env=env)
    for p in trainer.model.parameters():
        assert p.placements == (Replicate(), Shard(0))
    losses = [trainer.train_step()["loss"] for _ in range(3)]
    state = {n: p.full_tensor() for n, p in trainer.model.named_parameters()}
    if env.is_main:
        torch.save({"losses": losses, "state": state}, out / "hsdp.pt")


def test_hsdp_2x2_trains_as_one_process(sharded_checkpoint, tmp_path):
    """4 gloo ranks as 2 replicas x 2 shards load the tiny model sharded within each replica, and train a toy model
    to the losses and weights of 1 process with 4x the accumulation."""
    from engine.distributed import init_distributed

    run_distributed(_hsdp_worker, 4, tmp_path, sharded_checkpoint)
    got = torch.load(tmp_path / "hsdp.pt")
    with init_distributed("cpu") as env:
        cfg = TrainConfig(output_dir=str(tmp_path / "one"), max_steps=3, lr=5e-2, progress_bar=False, plot=False,
                          export_hf=False, seed=4, grad_clip=0.5)  # fmt: skip
        source = IndexedBatchSource(make_dataset(24), micro_batch_size=2, grad_accum_steps=4, collate=collate,
                                    shuffle=False)  # fmt: skip
        trainer = Trainer(ToyVLM(seed=2), token_ce_objective, source, cfg, env=env)
        losses = [trainer.train_step()["loss"] for _ in range(3)]
        for name, p in trainer.model.named_parameters():
            torch.testing.assert_close(got["state"][name], p.full_tensor(), rtol=1e-5, atol=1e-6)
    assert losses == pytest.approx(got["losses"], rel=1e-6)
    assert not math.isclose(losses[0], losses[-1])  # it trained
