"""benchmarks/memory_plan.py: per-rank, per-phase bytes from a meta-device build, on the tiny and the 7B shapes."""

import math

import pytest

from benchmarks.memory_plan import GB, main, model_config, model_params
from engine.config import LoRAConfig

GRPO_7B = "recipes/configs/grpo_qwen2_5_vl_7b.toml"
SFT_7B = "recipes/configs/sft_qwen2_5_vl_7b.toml"


def _phase(result, name):
    return next(ph for ph in result["phases"] if ph.name == name)


def test_7b_shape_is_qwen2_5_vl_7b():
    params = model_params(model_config("7b"), LoRAConfig(enabled=False, freeze_vision=False))
    total = sum(p.numel for p in params)
    assert total == 8_292_166_656  # Qwen2.5-VL-7B-Instruct: 8.29 B
    assert sum(p.numel for p in params if p.name.startswith("visual.")) == 676_550_144


def test_7b_lora_plan_fits_and_its_weights_are_exact(capsys):
    result = main(["--config", GRPO_7B, "--gpus", "8"])
    printed = capsys.readouterr().out
    assert "| rollout |" in printed and "| export |" in printed and "fits in an 80 GB GPU" in printed
    assert [ph.name for ph in result["phases"]] == ["load", "rollout", "reference", "update", "checkpoint", "export"]
    params = model_params(model_config("7b"), LoRAConfig(enabled=True, rank=64, alpha=128.0, freeze_vision=True))
    frozen = sum(math.ceil(p.shape[0] / 8) * p.numel // p.shape[0] for p in params if not p.trainable)
    lora = sum(math.ceil(p.shape[0] / 8) * p.numel // p.shape[0] for p in params if p.trainable)
    load = _phase(result, "load")
    assert load.gpu["weights"] == 2 * frozen + 4 * lora  # bf16 base shards + fp32 adapter shards
    assert 150e6 < result["trainable"] < 170e6  # r=64 on the 7 projections of 28 layers: 161.5 M
    update = _phase(result, "update")
    assert update.gpu["optimiser"] == 2 * update.gpu["gradients"] == 8 * lora
    rollout = _phase(result, "rollout")
    assert rollout.gpu["gathered"] > 16 * GB and rollout.gpu["KV cache"] > 12 * GB  # bf16 model + 64 rows x 3.3k
    assert result["fits"] and result["host_per_node"] < 64 * GB  # no full copy per rank in host RAM


def test_7b_full_fine_tuning_and_two_nodes_hsdp():
    one = main(["--config", GRPO_7B, "--gpus", "8", "--lora.enabled", "false"])
    assert _phase(one, "update").gpu["reference"] == pytest.approx(2 * 8.29e9 / 8, rel=0.01)  # bf16 shards only
    assert one["trainable"] == 8_292_166_656 - 676_550_144  # vision frozen
    two = main(["--config", GRPO_7B, "--gpus", "8", "--nodes", "2", "--lora.enabled", "false",
                "--train.dp_replicate", "0"])  # fmt: skip
    assert (two["replicate"], two["shard_ranks"]) == (2, 8)  # HSDP: shards stay within a node
    assert _phase(two, "update").gpu["optimiser"] == _phase(one, "update").gpu["optimiser"]
    flat = main(["--config", GRPO_7B, "--gpus", "8", "--nodes", "2", "--lora.enabled", "false"])
    assert flat["shard_ranks"] == 16 and _phase(flat, "update").total < _phase(two, "update").total


def test_tiny_sft_plan(capsys):
    result = main(["--config", SFT_7B, "--gpus", "2", "--model", "tiny"])
    assert result["kind"] == "sft" and result["fits"]
    assert [ph.name for ph in result["phases"]] == ["load", "update", "checkpoint", "export"]
    assert _phase(result, "load").gpu["weights"] < 10e6
    assert "sft" in capsys.readouterr().out


@pytest.mark.parametrize("lora", [False, True])
def test_static_step_copies_are_what_the_static_step_allocates(lora):
    """The rollout's "static step copies" column counts exactly the buffers StaticDecodeStep allocates (fused
    q/k/v, their adapters' fused factors) in bf16, and no merged copy of any other weight."""
    import torch

    from benchmarks.memory_plan import fused_qkv_bytes
    from engine.models import VLModel
    from engine.models.static_decode import StaticDecodeStep
    from engine.train.lora import apply_lora

    config = model_config("tiny")
    lora_cfg = LoRAConfig(enabled=lora, rank=8, alpha=16.0, freeze_vision=True)
    model = VLModel(config).to(torch.bfloat16)
    if lora:
        apply_lora(model, lora_cfg)
    step = StaticDecodeStep(model, cuda_graph=False)
    allocated = sum(t.numel() * t.element_size() for layer in step.layers for t in layer.qkv.tensors())
    assert fused_qkv_bytes(model_params(config, lora_cfg)) == allocated
