"""Checkpoint loading/saving: round trips (single, sharded, HF-5 names, dtype) and clear errors for bad input."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from engine.models import CheckpointError, ModelConfigError, create_tiny_checkpoint, from_pretrained, save_pretrained
from engine.models.loading import engine_name


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return create_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "ckpt", seed=0)


def tensors(path):
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def write_variant(src, dst, state, config=None):
    dst.mkdir()
    save_file(state, str(dst / "model.safetensors"))
    cfg = json.loads((src / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps(config or cfg))
    return dst


def test_tiny_is_deterministic_and_small(tmp_path, tiny):
    again = create_tiny_checkpoint(tmp_path / "again", seed=0)
    other = create_tiny_checkpoint(tmp_path / "other", seed=1)
    a, b, c = tensors(tiny), tensors(again), tensors(other)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["model.layers.0.mlp.up_proj.weight"], c["model.layers.0.mlp.up_proj.weight"])
    n = sum(t.numel() for t in a.values())
    assert 1_000_000 < n < 10_000_000
    for name in ("config.json", "tokenizer.json", "preprocessor_config.json"):
        assert (tiny / name).is_file()
    assert (tiny / "tokenizer.json").read_bytes() == (again / "tokenizer.json").read_bytes()  # BPE training repeats


def test_round_trip_sharded_and_dtype(tmp_path, tiny):
    model = from_pretrained(tiny)
    save_pretrained(model, tmp_path / "sharded", max_shard_bytes=2_000_000)
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    again = from_pretrained(tmp_path / "sharded")
    for (n1, p1), (n2, p2) in zip(model.named_parameters(), again.named_parameters()):
        assert n1 == n2 and torch.equal(p1, p2), n1
    half = from_pretrained(tmp_path / "sharded", dtype=torch.bfloat16)
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}
    assert not any(p.is_meta for p in half.parameters())
    assert torch.equal(half.lm_head_weight, model.lm_head_weight.to(torch.bfloat16))


def test_transformers5_names_load(tmp_path, tiny):
    renamed = {}
    for k, v in tensors(tiny).items():
        k = k.replace("model.", "model.language_model.", 1) if k.startswith("model.") else "model." + k
        renamed[k] = v
    assert engine_name("model.language_model.layers.0.mlp.up_proj.weight") == "model.layers.0.mlp.up_proj.weight"
    model = from_pretrained(write_variant(tiny, tmp_path / "v5", renamed))
    ref = from_pretrained(tiny)
    assert torch.equal(model.visual.blocks[0].attn.qkv.weight, ref.visual.blocks[0].attn.qkv.weight)


def test_missing_unexpected_misshaped_listed_together(tmp_path, tiny):
    state = tensors(tiny)
    del state["model.layers.1.self_attn.q_proj.bias"]
    state["visual.blocks.0.extra.weight"] = torch.zeros(3)
    state["model.norm.weight"] = torch.ones(7)
    with pytest.raises(CheckpointError) as err:
        from_pretrained(write_variant(tiny, tmp_path / "bad", state))
    msg = str(err.value)
    assert "missing (1): model.layers.1.self_attn.q_proj.bias" in msg
    assert "unexpected (1): visual.blocks.0.extra.weight" in msg
    assert "mis-shaped (1): model.norm.weight (model.safetensors): checkpoint (7,), model (192,)" in msg


def test_truncated_file_names_the_file(tmp_path, tiny):
    bad = write_variant(tiny, tmp_path / "trunc", tensors(tiny))
    file = bad / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[: len(data) - 1000])
    with pytest.raises(CheckpointError, match=r"trunc/model.safetensors: truncated safetensors file"):
        from_pretrained(bad)
    file.write_bytes(data[:5])
    with pytest.raises(CheckpointError, match="truncated"):
        from_pretrained(bad)


def test_missing_shard_and_missing_weights(tmp_path, tiny):
    model = from_pretrained(tiny)
    save_pretrained(model, tmp_path / "sh", max_shard_bytes=2_000_000)
    next((tmp_path / "sh").glob("model-00002-*.safetensors")).unlink()
    with pytest.raises(CheckpointError, match="shard files missing"):
        from_pretrained(tmp_path / "sh")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text((tiny / "config.json").read_text())
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        from_pretrained(tmp_path / "empty")


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"model_type": "llama"}, "model_type 'llama' is not supported"),
        ({"use_sliding_window": True}, "use_sliding_window"),
        ({"rope_scaling": {"type": "yarn", "factor": 4.0}}, "rope type 'yarn'"),
        ({"rope_scaling": {"type": "mrope", "mrope_section": [4, 4, 4]}}, "mrope_section"),
        ({"hidden_act": "gelu"}, "hidden_act"),
    ],
)
def test_unsupported_config(tmp_path, tiny, change, match):
    cfg = json.loads((tiny / "config.json").read_text())
    cfg.update(change)
    with pytest.raises(ModelConfigError, match=match) as err:
        from_pretrained(write_variant(tiny, tmp_path / "cfg", tensors(tiny), cfg))
    assert "config.json" in str(err.value)


def test_tiny_cli_writes_the_seeded_random_default(tmp_path, capsys):
    """``python -m engine.models.create_tiny OUT --seed S`` writes the weights of ``create_tiny_checkpoint(seed=S)``,
    and another seed other weights."""
    from engine.models.create_tiny import main as tiny_main

    tiny_main([str(tmp_path / "cli"), "--seed", "3"])
    assert f"[tiny] wrote {tmp_path / 'cli'}" in capsys.readouterr().out
    create_tiny_checkpoint(tmp_path / "api", seed=3)
    create_tiny_checkpoint(tmp_path / "other", seed=4)
    cli, api, other = (from_pretrained(tmp_path / n).state_dict() for n in ("cli", "api", "other"))
    assert all(torch.equal(cli[k], api[k]) for k in api)
    assert not torch.equal(cli["model.embed_tokens.weight"], other["model.embed_tokens.weight"])
