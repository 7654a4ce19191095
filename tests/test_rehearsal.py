"""The 7B GRPO recipe rehearsed on 8 gloo ranks with a scaled-down model of the same architecture.

``recipes/configs/grpo_qwen2_5_vl_7b.toml`` as it is (LoRA r=64 on a bf16 base, frozen vision tower, activation
checkpointing), in crop mode, with the probe, DCP checkpoints and a resume, and the sharded bf16 export; only the
sizes are overridden (one prompt per rank and step, 2 samples). The model is Qwen2.5-VL's architecture scaled down
(head_dim 128 and M-RoPE sections 16/24/24 as in 7B, untied head, a 32k vocabulary beyond the tiny tokenizer's 512
so that the embedding and head weigh what they weigh at scale; 2 + 2 blocks, one window- and one full-attention
ViT block), stored bf16 in HF's sharded layout. Sampling is scripted (a well-formed SIF trace with a box, or the
same trace with a broken answer tag, by a coin flip from the rollout's generator), so every rollout splices crop
views and groups have reward variance; the forwards, log-probs and updates are the real ones.

Checked: each rank reads its share of the checkpoint's bytes (every byte read exactly once) and its peak RSS while
loading stays within its shards plus one slice and a fixed allowance, below a full copy; the losses of the 8-rank
run (3 steps, the third after a resume from the step-2 checkpoint) equal those of one process trained on the same
micro-batches; the export equals the 8-rank model's own gathered, merged, bf16 weights and the one-process run's.
About 3 minutes on 2 cores.
"""

import dataclasses
import importlib
import json
from pathlib import Path

import pytest
import torch
from _toys import run_distributed

ROOT = Path(__file__).resolve().parents[1]
TOML = ROOT / "recipes/configs/grpo_qwen2_5_vl_7b.toml"
SCRIPT = (
    '<think><area>[{"bbox_2d":[0.1,0.2,0.4,0.6],"depth":0.25}]</area><text>the cube</text></think><answer>A</answer>'
)
WORLD = 8
LOAD_ALLOWANCE_MIB = 32.0  # fixed per-process allowance: allocator slack, FSDP/DTensor bookkeeping, page tables


def _argv(ckpt: Path, out: Path, steps: int, resume: bool = False) -> list[str]:
    return [
        "--config", str(TOML), "--model.path", str(ckpt), "--train.output_dir", str(out),
        "--rl.focus_mode", "crop", "--rl.num_generations", "2", "--rl.max_completion_length", "96",
        "--rl.rollout_prompts_per_rank", "2",  # the TOML's 8 would cost 4x the rollout here; 2 keeps P > S
        "--lora.dropout", "0",  # dropout masks come from per-rank streams; the 1-process replay could not match them
        "--data.limit", "16", "--train.grad_accum_steps", "1", "--train.max_steps", str(steps),
        "--train.checkpoint_every", "1",
        "--train.lr", "2e-3", "--train.export_max_shard_mb", "32", "--probe_prompts", "8", "--summary_window", "1",
        "--train.progress_bar", "false", "--train.plot", "false", *(["--resume"] if resume else []),
    ]  # fmt: skip


def _scripted_sampler(tok):
    """Each row of a generate call emits SCRIPT or, by a coin flip from the call's generator, SCRIPT with its last
    token replaced by the end of turn (a malformed answer tag, format reward 0); both end at the same step."""
    good = tok.encode(SCRIPT)
    bad = good[:-1] + [tok.im_end_id]
    scripts = torch.tensor([good, bad])
    state: dict = {}

    def sample(logits, temperature, top_p, generator, banned=()):
        step, choice = state.get(generator, (0, None))
        if choice is None:
            choice = (torch.rand(logits.shape[0], generator=generator) < 0.5).long()
        state[generator] = (step + 1, choice)
        tokens = scripts[choice[: logits.shape[0]], min(step, scripts.shape[1] - 1)]
        return tokens, torch.log_softmax(logits.float(), -1).gather(1, tokens[:, None])[:, 0]

    return sample


def _status() -> dict[str, float]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                out[line.split(":")[0]] = int(line.split()[1]) / 1024
    return out


def _instrument(env, ckpt: Path, out: Path) -> None:
    """In a rank: scripted sampling, the load measured on its own, every step's micro-batches recorded, and the
    export's reference (the gathered, merged, bf16 state) written by rank 0."""
    import engine.recipes.policy as common
    import engine.train.checkpoint as ckpt_module
    from engine.models import Tokenizer, VLModel, load_model_config
    from engine.rl.source import GRPOBatchSource
    from engine.train.lora import lora_scalings, merge_lora_state_dict

    gen_module = importlib.import_module("engine.models.generate")  # the package re-exports a function of that name
    gen_module.sample_tokens = _scripted_sampler(Tokenizer.from_file(ckpt))
    with torch.device("meta"):  # one-off imports the first meta-device build triggers (~100 MB), outside the window
        VLModel(load_model_config(ckpt))

    real_build = common.build_sharded_model

    def measured_build(*args, **kwargs):
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset this process's peak RSS to its current RSS
        before = _status()["VmRSS"]
        model, stats = real_build(*args, **kwargs)
        local = sum(p.to_local().numel() * p.element_size() for p in model.parameters())
        record = {"peak_delta_mib": _status()["VmHWM"] - before, "shards_bytes": local, **dataclasses.asdict(stats)}
        with open(out / f"load_rank{env.rank}.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        return model, stats

    common.build_sharded_model = measured_build

    real_next = GRPOBatchSource.next_step

    def recorded_next(self, ctx):
        batches = real_next(self, ctx)
        torch.save(batches, out / f"batches_step{ctx.step}_rank{env.rank}.pt")
        return batches

    GRPOBatchSource.next_step = recorded_next

    real_export = ckpt_module.export_hf

    def export_with_reference(model, out_dir, **kwargs):
        state = ckpt_module.full_state_dict(model)
        if env.is_main:
            merged = merge_lora_state_dict(state, lora_scalings(model))
            torch.save({k: v.to(torch.bfloat16) for k, v in merged.items()}, out / "gathered_merged.pt")
        return real_export(model, out_dir, **kwargs)

    ckpt_module.export_hf = export_with_reference


def _worker(env, ckpt: Path, out: Path) -> None:
    _instrument(env, ckpt, out)
    from engine.recipes import grpo_sif

    cfg = grpo_sif.load_config(grpo_sif.GRPORecipeConfig(), _argv(ckpt, out / "runs", 2))
    grpo_sif.run(cfg, env)
    cfg = grpo_sif.load_config(grpo_sif.GRPORecipeConfig(), _argv(ckpt, out / "runs", 3, resume=True))
    grpo_sif.run(cfg, env)


def _scaled_checkpoint(path: Path) -> Path:
    """Qwen2.5-VL's architecture, scaled down; bf16 weights in HF's sharded layout, with the tiny tokenizer."""
    from engine.models import VLModel, create_tiny_checkpoint, save_pretrained, tiny_config
    from engine.models.config import qwen2_5_vl_7b_config
    from engine.models.tiny import init_weights

    big = qwen2_5_vl_7b_config()
    tiny = tiny_config()
    text = dataclasses.replace(
        big.text, vocab_size=32768, hidden_size=512, intermediate_size=1024, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=None,
    )  # fmt: skip
    vision = dataclasses.replace(big.vision, depth=2, hidden_size=256, intermediate_size=512, num_heads=4,
                                 out_hidden_size=512, fullatt_block_indexes=[1])  # fmt: skip
    special = {f: getattr(tiny, f) for f in ("image_token_id", "video_token_id", "vision_start_token_id",
                                             "vision_end_token_id", "bos_token_id", "eos_token_id")}  # fmt: skip
    config = dataclasses.replace(big, text=text, vision=vision, **special)
    create_tiny_checkpoint(path / "files", seed=0, config=tiny)  # tokenizer + processor files
    model = VLModel(config)
    init_weights(model, seed=0)
    save_pretrained(model.to(torch.bfloat16), path / "ckpt", max_shard_bytes=24 << 20)
    for name in ("tokenizer.json", "preprocessor_config.json"):
        (path / "ckpt" / name).write_bytes((path / "files" / name).read_bytes())
    return path / "ckpt"


class _Replay:
    """One process's batch source: step k's micro-batches of all 8 ranks, in rank order."""

    def __init__(self, out: Path) -> None:
        self.out = out

    def next_step(self, ctx):
        return [mb for r in range(WORLD) for mb in torch.load(self.out / f"batches_step{ctx.step}_rank{r}.pt",
                                                                weights_only=False)]  # fmt: skip

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


@pytest.mark.slow
def test_7b_recipe_rehearsal_on_8_ranks(tmp_path: Path) -> None:
    ckpt = _scaled_checkpoint(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    run_distributed(_worker, WORLD, ckpt, out)

    # --- loading: each rank read its share (every byte once) and held its shards plus a bounded overhead
    loads = [[json.loads(x) for x in (out / f"load_rank{r}.jsonl").read_text().splitlines()] for r in range(WORLD)]
    for run in range(2):
        total = loads[0][run]["checkpoint_bytes"]
        assert sum(rank[run]["bytes_read"] for rank in loads) == total
        full_model = sum(rank[run]["shards_bytes"] for rank in loads)
        for rank in loads:
            rec = rank[run]
            assert 0.75 * total / WORLD < rec["bytes_read"] < 1.3 * total / WORLD, rec
            bound = (rec["shards_bytes"] + rec["largest_slice_bytes"]) / 2**20 + LOAD_ALLOWANCE_MIB
            assert rec["peak_delta_mib"] < bound, (rec, bound)
            assert bound < full_model / 2**20  # a full copy (what every rank loaded before) would break the bound

    # --- losses: the 8-rank run (steps 1-2, then 3 after the resume) equals one process on the same micro-batches
    run_dir = out / "runs" / "grpo-qwen2_5_vl_7b"
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2, 3]
    assert all(r["rollout/views_per_sample"] > 0 for r in lines)  # crop views were spliced into every rollout
    assert any(r["reward/group_std"] > 0 for r in lines)
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step_00000002", "step_00000003"]
    assert json.loads((run_dir / "probe.json").read_text())["prompts"] == 8

    import engine.recipes.policy as common
    from engine.distributed import init_distributed
    from engine.recipes import grpo_sif
    from engine.rl.grpo import GRPOObjective
    from engine.train.trainer import Trainer

    cfg = grpo_sif.load_config(grpo_sif.GRPORecipeConfig(), _argv(ckpt, out / "one", 3))
    cfg.train.grad_accum_steps *= WORLD
    with init_distributed("cpu") as env:
        model, _ = common.load_policy(ckpt, cfg.model, cfg.lora, cfg.data, cfg.train.seed, env, cfg.train)
        trainer = Trainer(model, GRPOObjective(cfg.rl), _Replay(out), cfg.train, env=env, phase="grpo")
        result = trainer.fit()
    one = [json.loads(line) for line in (out / "one/grpo-qwen2_5_vl_7b/metrics.jsonl").read_text().splitlines()]
    assert result.step == 3
    for a, b in zip(lines, one):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4, abs=1e-7), (a["step"], a["loss"], b["loss"])
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-3), a["step"]
    assert len({r["loss"] for r in lines}) == 3  # the policy moved

    # --- export: streamed shards + index in bf16, equal to the gathered merged weights, and to the 1-process run
    from engine.models import from_pretrained

    index = json.loads((run_dir / "hf/model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) >= 2
    exported = dict(from_pretrained(run_dir / "hf").named_parameters())
    gathered = torch.load(out / "gathered_merged.pt")
    single = dict(from_pretrained(out / "one/grpo-qwen2_5_vl_7b/hf").named_parameters())
    assert set(exported) == set(gathered) == set(single)
    for name, tensor in exported.items():
        assert tensor.dtype == torch.bfloat16 and torch.equal(tensor, gathered[name]), name
        torch.testing.assert_close(tensor.float(), single[name].float(), rtol=1e-2, atol=1e-3)
