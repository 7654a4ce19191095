"""LoRA: zero-init identity, adapters-off context, merging, targeting and freezing."""

import pytest
import torch
from _toys import ToyVLM

from engine.config import LoRAConfig
from engine.train.lora import (
    LoRALinear,
    apply_lora,
    freeze_vision_tower,
    lora_disabled,
    lora_scalings,
    merge_and_unload,
    merge_lora_state_dict,
)


def _inputs():
    gen = torch.Generator().manual_seed(3)
    return torch.randint(0, 32, (2, 5), generator=gen), torch.randn(2, 4, generator=gen)


def _perturb_adapters(model):
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("lora_B"):
                param.normal_(0, 0.5)


def test_fresh_adapters_leave_output_unchanged_and_only_adapters_train():
    ids, image = _inputs()
    base = ToyVLM()
    model = ToyVLM()
    names = apply_lora(model, LoRAConfig(enabled=True, rank=4, alpha=8, target_modules=("up_proj", "down_proj")))
    assert names == [f"layers.{i}.{p}" for i in range(3) for p in ("up_proj", "down_proj")]
    torch.testing.assert_close(model(ids, image), base(ids, image), rtol=0, atol=0)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.lora_{ab}" for n in names for ab in "AB"}
    # base parameter names are unchanged, so checkpoints of the base model still load
    assert set(base.state_dict()) <= set(model.state_dict())


def test_disabled_context_gives_base_output_and_restores():
    ids, image = _inputs()
    base = ToyVLM()
    model = ToyVLM()
    apply_lora(model, LoRAConfig(enabled=True, rank=2, alpha=4, target_modules=("layers.*.up_proj",)))
    _perturb_adapters(model)
    adapted = model(ids, image)
    assert not torch.allclose(adapted, base(ids, image))
    with lora_disabled(model):
        torch.testing.assert_close(model(ids, image), base(ids, image), rtol=0, atol=0)
    torch.testing.assert_close(model(ids, image), adapted, rtol=0, atol=0)


def test_merge_matches_unmerged_output():
    ids, image = _inputs()
    model = ToyVLM()
    apply_lora(model, LoRAConfig(enabled=True, rank=3, alpha=6, dropout=0.1, target_modules=("up_proj", "lm_head")))
    _perturb_adapters(model)
    model.eval()  # dropout off: merged weights are the deterministic function
    expected = model(ids, image)
    merged_sd = merge_lora_state_dict(model.state_dict(), lora_scalings(model))
    assert not any("lora_" in k for k in merged_sd)
    fresh = ToyVLM()
    fresh.load_state_dict(merged_sd)
    torch.testing.assert_close(fresh(ids, image), expected, rtol=1e-5, atol=1e-5)
    merge_and_unload(model)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    torch.testing.assert_close(model(ids, image), expected, rtol=1e-5, atol=1e-5)


def test_vision_tower_is_left_alone_and_can_be_frozen():
    model = ToyVLM()
    names = apply_lora(model, LoRAConfig(enabled=True, target_modules=("*",), freeze_vision=True))
    assert names and not any(n.startswith("vision_tower") for n in names)
    full = ToyVLM()
    frozen = freeze_vision_tower(full)
    assert frozen == sum(p.numel() for p in full.vision_tower.parameters())
    assert all(p.requires_grad for n, p in full.named_parameters() if not n.startswith("vision_tower"))


def test_no_matching_module_is_an_error_listing_real_names():
    with pytest.raises(ValueError, match=r"match no nn.Linear.*up_proj"):
        apply_lora(ToyVLM(), LoRAConfig(enabled=True, target_modules=("q_proj",)))


def test_adapter_init_ignores_the_global_rng():
    """Ranks that drew different random numbers before must still build identical adapters (FSDP2 shards them)."""
    cfg = LoRAConfig(enabled=True, rank=2, target_modules=("up_proj",))
    models = []
    for draw in (0, 7):
        torch.manual_seed(draw)
        model = ToyVLM()
        apply_lora(model, cfg, seed=1)
        models.append(model)
    a, b = (dict(m.named_parameters()) for m in models)
    assert torch.equal(a["layers.0.up_proj.lora_A"], b["layers.0.up_proj.lora_A"])
    assert not torch.equal(a["layers.0.up_proj.lora_A"], a["layers.1.up_proj.lora_A"])


def test_adapters_take_the_mode_of_the_module_they_replace():
    """Finding 3: a model put in eval mode before LoRA is applied stays in eval mode (no adapter dropout), and a
    model in training mode gets adapters in training mode."""
    ids, image = _inputs()
    model = ToyVLM().eval()
    apply_lora(model, LoRAConfig(enabled=True, rank=4, alpha=8, dropout=0.5, target_modules=("up_proj",)))
    assert not any(m.training for m in model.modules())
    _perturb_adapters(model)
    torch.testing.assert_close(model(ids, image), model(ids, image), rtol=0, atol=0)  # deterministic
    trained = ToyVLM().train()
    apply_lora(trained, LoRAConfig(enabled=True, rank=4, alpha=8, dropout=0.5, target_modules=("up_proj",)))
    assert all(m.training for m in trained.modules())
