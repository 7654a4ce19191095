"""The shipped tiny preset loads and changes only what its header says: both focusing modes get the same
generated records, SFT length and batch, so the crop-vs-text comparison differs in the mode alone."""

import dataclasses
from pathlib import Path

from engine.config import load_config
from engine.recipes.grpo_sif import GRPORecipeConfig

PRESET = Path(__file__).resolve().parents[1] / "recipes" / "configs" / "grpo_tiny_long.toml"


def _flat(obj, prefix=""):
    if dataclasses.is_dataclass(obj):
        out = {}
        for f in dataclasses.fields(obj):
            out.update(_flat(getattr(obj, f.name), f"{prefix}{f.name}."))
        return out
    return {prefix.rstrip("."): obj}


def test_the_long_preset_changes_only_data_and_sft_length() -> None:
    default = _flat(GRPORecipeConfig())
    text = _flat(load_config(GRPORecipeConfig(), ["--config", str(PRESET), "--rl.focus_mode", "text"]))
    crop = _flat(load_config(GRPORecipeConfig(), ["--config", str(PRESET), "--rl.focus_mode", "crop"]))
    changed = {k: v for k, v in text.items() if v != default[k]}
    assert changed == {
        "synth.records": 6000,
        "sft.synth.records": 6000,
        "sft.train.max_steps": 1000,
        "sft.train.micro_batch_size": 4,
    }
    assert {k for k in text if text[k] != crop[k]} == {"rl.focus_mode"}
