"""Config loading: defaults <- file <- CLI, typed parsing, and errors that name the key."""

import json
from dataclasses import dataclass, field
from typing import Literal

import pytest

from engine.config import ConfigError, LoRAConfig, TrainConfig, load_config, to_dict


@dataclass
class ExtraSection:
    num_generations: int = 8
    mode: Literal["text", "crop"] = "text"
    judge_url: str | None = None
    weights: list[float] = field(default_factory=lambda: [1.0, 1.0])


@dataclass
class RecipeConfig:
    train: TrainConfig = field(default_factory=TrainConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    rl: ExtraSection = field(default_factory=ExtraSection)


def test_cli_overrides_are_typed_by_the_dataclass():
    cfg = load_config(
        RecipeConfig(),
        [
            "--train.lr", "3e-4", "--train.max_steps=12", "--lora.enabled", "--lora.target_modules", "q_proj, v_proj",
            "--train.betas", "[0.9, 0.95]", "--rl.mode", "crop", "--rl.judge_url", "none", "--rl.weights", "0.5,2",
            "--rl.num_generations", "4", "--resume", "--train.grad_clip", "-1",
        ],
    )  # fmt: skip
    assert cfg.train.lr == 3e-4 and isinstance(cfg.train.lr, float)
    assert cfg.train.max_steps == 12
    assert cfg.lora.enabled is True
    assert cfg.lora.target_modules == ("q_proj", "v_proj")
    assert cfg.train.betas == (0.9, 0.95)
    assert cfg.rl.mode == "crop" and cfg.rl.judge_url is None and cfg.rl.weights == [0.5, 2.0]
    assert cfg.rl.num_generations == 4
    assert cfg.train.resume is True
    assert cfg.train.grad_clip == -1.0


def test_defaults_are_not_mutated():
    defaults = RecipeConfig()
    load_config(defaults, ["--rl.weights", "3,4", "--train.lr", "1"])
    assert defaults.rl.weights == [1.0, 1.0] and defaults.train.lr == TrainConfig().lr


def test_file_then_cli_precedence(tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text('[train]\nlr = 0.5\nmax_steps = 7\nrun_name = "from_file"\n[rl]\nmode = "crop"\n')
    cfg = load_config(RecipeConfig(), ["--config", str(toml), "--train.lr", "0.25"])
    assert (cfg.train.lr, cfg.train.max_steps, cfg.train.run_name, cfg.rl.mode) == (0.25, 7, "from_file", "crop")
    js = tmp_path / "run.json"
    js.write_text(json.dumps({"lora": {"rank": 64, "alpha": 128}, "train": {"betas": [0.8, 0.9]}}))
    cfg = load_config(RecipeConfig(), [], config_file=js)
    assert (cfg.lora.rank, cfg.lora.alpha, cfg.train.betas) == (64, 128.0, (0.8, 0.9))
    assert to_dict(cfg)["lora"]["rank"] == 64


@pytest.mark.parametrize(
    "argv, fragments",
    [
        (["--train.lrr", "1"], ["'train.lrr'", "'train.lr'"]),
        (["--trian.max_steps", "1"], ["'trian.max_steps'", "'train.max_steps'"]),
        (["--rl.num_generation", "8"], ["'rl.num_generation'", "'rl.num_generations'"]),
        (["--train.max_steps", "1.5"], ["train.max_steps", "int"]),
        (["--train.resume", "maybe"], ["train.resume", "bool"]),
        (["--rl.mode", "focus"], ["rl.mode", "'text'", "'crop'"]),
        (["--train.betas", "0.9"], ["train.betas", "2 items"]),
        (["--train.lr"], ["--train.lr needs a value"]),
        (["--train", "1"], ["train is a section"]),
        (["lr", "1"], ["unexpected command-line argument 'lr'"]),
    ],
)
def test_bad_cli_input_names_the_key(argv, fragments):
    with pytest.raises(ConfigError) as err:
        load_config(RecipeConfig(), argv)
    for fragment in fragments:
        assert fragment in str(err.value)


def test_bad_file_names_file_and_key(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"train": {"warmup": 0.1}}))
    with pytest.raises(ConfigError, match=r"bad\.json.*'train\.warmup'.*'train\.warmup_ratio'"):
        load_config(RecipeConfig(), ["--config", str(bad)])
    typed = tmp_path / "typed.json"
    typed.write_text(json.dumps({"train": {"max_steps": "ten"}}))
    with pytest.raises(ConfigError, match="train.max_steps"):
        load_config(RecipeConfig(), ["--config", str(typed)])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(RecipeConfig(), ["--config", str(tmp_path / "missing.toml")])


def test_help_lists_every_key_with_its_resolved_value(capsys):
    with pytest.raises(SystemExit) as exit_info:
        load_config(RecipeConfig(), ["--rl.mode", "crop", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "--rl.mode Literal['text', 'crop'] = 'crop'" in out
    assert "--train.lr float = 1e-05" in out and "--lora.target_modules tuple[str, ...]" in out
