"""End-to-end smoke run of the recipes at toy sizes: SFT warm-up -> GRPO-SIF -> eval, in one process."""

import json
from pathlib import Path

import pytest
import torch
from torch.distributed.fsdp import FSDPModule

REWARD_BOUNDS = {"format": 1.0, "answer": 2.0, "grounding": 2.0, "depth": 1.0}  # answer, grounding: with progress


@pytest.fixture(scope="module")
def recipes():
    from engine.recipes import eval_sif, grpo_sif

    return grpo_sif, eval_sif


def test_grpo_recipe_runs_sft_then_grpo_and_logs_rewards(recipes, tmp_path: Path, capsys, monkeypatch) -> None:
    grpo_sif, eval_sif = recipes
    probed = []
    real_probe = grpo_sif.probe_rewards

    def spy(model, *args, **kwargs):  # the probes must run on the sharded model, on the training device
        probed.append((isinstance(model, FSDPModule), kwargs.get("device")))
        return real_probe(model, *args, **kwargs)

    monkeypatch.setattr(grpo_sif, "probe_rewards", spy)
    out = str(tmp_path / "runs")
    common = ["--train.progress_bar", "false", "--train.plot", "false"]
    argv = [
        "--train.output_dir", out, "--train.max_steps", "2", "--train.micro_batch_size", "1", *common,
        "--rl.num_generations", "2", "--rl.max_completion_length", "16", "--rl.num_iterations", "2",
        "--data.limit", "4",
        "--sft.train.output_dir", out, "--sft.train.max_steps", "2", "--sft.train.micro_batch_size", "1",
        "--sft.data.limit", "2", "--sft.train.progress_bar", "false", "--sft.train.plot", "false",
        "--sft.model.align_steps", "2", "--sft.model.align_scenes", "4",
        "--summary_window", "1", "--probe_prompts", "2", "--eval_limit", "2", "--eval.max_new_tokens", "8",
    ]  # fmt: skip
    result = grpo_sif.main(argv)
    assert result.step == 2
    sft_lines = [json.loads(line) for line in (tmp_path / "runs/sft-tiny/metrics.jsonl").read_text().splitlines()]
    assert [r["phase"] for r in sft_lines] == ["sft", "sft"]
    lines = [json.loads(line) for line in (tmp_path / "runs/grpo-tiny/metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2]
    assert lines[0]["reward/total"] == lines[1]["reward/total"]  # num_iterations 2: step 2 reuses step 1's rollouts
    for record in lines:
        assert record["phase"] == "grpo"
        for key, bound in REWARD_BOUNDS.items():  # each term's own range (docs/rewards.md), weights all 1
            assert 0.0 <= record[f"reward/{key}"] <= bound, key
        assert record["reward/total"] == pytest.approx(sum(record[f"reward/{key}"] for key in REWARD_BOUNDS))
        for key in ("kl", "clip_fraction", "entropy", "time/update"):
            assert key in record
    assert "time/rollout" in lines[0] and "time/reward" in lines[0] and "time/rollout" not in lines[1]
    assert (tmp_path / "runs/grpo-tiny/hf/model.safetensors").is_file()
    printed = capsys.readouterr().out
    assert "[sft] 2 steps" in printed and "reward/total" in printed
    assert "[align] tiny vision tower: 2 steps on 4 scenes" in printed  # the default's tower is aligned first
    assert (tmp_path / "runs/tiny-model-aligned2x4/model.safetensors").is_file()
    probe = json.loads((tmp_path / "runs/grpo-tiny/probe.json").read_text())
    assert (probe["prompts"], probe["samples"]) == (2, 2)
    for when in ("before", "after"):
        assert 0.0 <= probe[when]["reward/format"] <= 1.0 and "reward/accuracy" in probe[when]
    assert "probe, the same 2 training prompts x 2 samples" in printed
    evals = json.loads((tmp_path / "runs/grpo-tiny/eval.json").read_text())
    assert list(evals) == ["SFT export", "after GRPO"]
    for part in evals.values():
        assert part["summary"]["num_records"] == 2 and len(part["records"]) == 2
        assert "majority" in part["summary"] and "chance" in part["summary"]
    assert (tmp_path / "runs/grpo-tiny/eval.png").stat().st_size > 0
    assert "side by side" in printed and "majority" in printed
    assert probed == [(True, torch.device("cpu"))] * 2
    # the SFT export the GRPO run started from is bf16 (the default export dtype) and sharded-loadable
    assert json.loads((tmp_path / "runs/sft-tiny/hf/config.json").read_text())["torch_dtype"] == "bfloat16"

    summary = eval_sif.main(
        ["--model.path", str(result.export_dir), "--data.limit", "2", "--eval.max_new_tokens", "8",
         "--eval.output", str(tmp_path / "eval"), "--output_dir", out]
    )  # fmt: skip
    assert summary["num_records"] == 2
    assert summary["accuracy"] == 0.0  # 8 untrained bytes hold no <answer>: a missing answer is wrong
    saved = json.loads((tmp_path / "eval/eval.json").read_text())
    assert [part["summary"]["num_records"] for part in saved.values()] == [2]
    assert (tmp_path / "eval/eval.png").stat().st_size > 0
