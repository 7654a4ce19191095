"""DCP checkpoints: bit-for-bit resume on 2 processes, resharded load on 1, truncated-checkpoint fallback, export."""

import shutil

import pytest
import torch
import torch.distributed.checkpoint as dcp
from _toys import ToyVLM, collate, make_dataset, run_distributed, token_ce_objective
from safetensors.torch import load_file, save_file

from engine.config import LoRAConfig, TrainConfig
from engine.distributed import init_distributed
from engine.train import Checkpointer, IndexedBatchSource, Trainer, apply_lora, full_state_dict, read_metrics


def _trainer(env, root, run, *, resume=False, world=2):
    source = IndexedBatchSource(
        make_dataset(32), micro_batch_size=2, grad_accum_steps=4 // world, rank=env.rank, world_size=world,
        collate=collate, seed=3,
    )  # fmt: skip
    cfg = TrainConfig(
        run_name=run, output_dir=str(root), lr=2e-2, warmup_ratio=0.25, weight_decay=0.1, max_steps=4,
        checkpoint_every=2, keep_last=3, resume=resume, seed=11, progress_bar=False, plot=False,
        export_dtype="float32",  # the export must equal the fp32 weights
    )  # fmt: skip
    return Trainer(ToyVLM(dropout=0.3, seed=5), token_ce_objective, source, cfg, env=env)


def _save_full(model, path, env):
    state = full_state_dict(model)
    if env.is_main:
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))


def _resume_worker(env, root):
    straight = _trainer(env, root, "straight")
    straight.fit()
    _save_full(straight.model, root / "after4.safetensors", env)

    interrupted = _trainer(env, root, "interrupted")
    for _ in range(2):
        interrupted.metrics_log.write(interrupted.train_step())
    interrupted.save_checkpoint()
    _save_full(interrupted.model, root / "after2.safetensors", env)
    torch.rand(100)  # the "crashed" process drew more random numbers; the restart must not see them

    restarted = _trainer(env, root, "interrupted", resume=True)
    assert restarted.resume() and restarted.step == 2
    restarted.fit()
    for (name, p), (_, q) in zip(straight.model.named_parameters(), restarted.model.named_parameters()):
        assert torch.equal(p.full_tensor(), q.full_tensor()), name
    assert restarted.optimizer.state_dict()["state"].keys() == straight.optimizer.state_dict()["state"].keys()


def test_resume_bit_for_bit_then_reshard_and_fall_back(tmp_path, one_thread):
    run_distributed(_resume_worker, 2, tmp_path)
    straight = read_metrics(tmp_path / "straight" / "metrics.jsonl")
    resumed = read_metrics(tmp_path / "interrupted" / "metrics.jsonl")
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    assert [r["loss"] for r in resumed] == [r["loss"] for r in straight]  # exact, dropout included
    assert [r["grad_norm"] for r in resumed] == [r["grad_norm"] for r in straight]
    assert (tmp_path / "straight" / "curves.png").exists() is False  # plot=False honoured

    # HF export of the 2-process run: the model's own names, the final weights.
    after4 = load_file(str(tmp_path / "after4.safetensors"))
    exported = load_file(str(tmp_path / "straight" / "hf" / "model.safetensors"))
    assert exported.keys() == after4.keys()
    for name in after4:
        assert torch.equal(exported[name], after4[name]), name

    # A checkpoint written by 2 processes loads into 1 (resharded) — and a truncated newest one is skipped.
    ckpts = tmp_path / "straight" / "checkpoints"
    (ckpts / "step_00000006.tmp").mkdir()  # a save that died before its rename
    shutil.copytree(ckpts / "step_00000004", ckpts / "step_00000005")
    (ckpts / "step_00000005" / "manifest.json").unlink()  # a directory without its manifest
    with init_distributed("cpu") as env:
        trainer = _trainer(env, tmp_path, "straight", resume=True, world=1)
        with pytest.warns(UserWarning, match="step_00000005 .no manifest.json"):
            assert trainer.resume()
        assert trainer.step == 4
        for name, param in trainer.model.named_parameters():
            assert torch.equal(param.full_tensor(), after4[name]), name

        shard = next((ckpts / "step_00000004").glob("*.distcp"))
        shard.write_bytes(shard.read_bytes()[:-10])
        with pytest.warns(UserWarning) as caught:
            assert Checkpointer(ckpts, keep_last=3, env=env).latest_valid() == ckpts / "step_00000002"
        message = str(caught[0].message)
        assert "step_00000004" in message and "truncated" in message and "using step_00000002" in message

        with pytest.warns(UserWarning, match="world size 2"):
            assert trainer.resume()
        assert trainer.step == 2
        after2 = load_file(str(tmp_path / "after2.safetensors"))
        for name, param in trainer.model.named_parameters():
            assert torch.equal(param.full_tensor(), after2[name]), name

        # The next save keeps the newest keep_last=3 complete ones and sets the broken ones aside (never deleted).
        trainer.step = 3
        with pytest.warns(UserWarning, match="unusable checkpoint step_00000005 .* kept as step_00000005.broken"):
            trainer.save_checkpoint()
        assert sorted(p.name for p in ckpts.iterdir()) == [
            "step_00000002", "step_00000003", "step_00000004.broken", "step_00000005.broken"
        ]  # fmt: skip


@pytest.fixture
def one_thread():
    """Tiny ops: thread hand-offs would dominate on a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_lora_checkpoints_skip_the_frozen_base_and_refuse_another_setup(tmp_path, one_thread):
    def lora_trainer(env, targets, resume=False):
        model = ToyVLM(dropout=0.1, seed=5)
        apply_lora(model, LoRAConfig(enabled=True, rank=2, alpha=4, dropout=0.1, target_modules=targets), seed=1)
        source = IndexedBatchSource(make_dataset(16), micro_batch_size=2, grad_accum_steps=2, collate=collate)
        cfg = TrainConfig(output_dir=str(tmp_path), lr=1e-2, max_steps=2, resume=resume, progress_bar=False)
        return Trainer(model, token_ce_objective, source, cfg, env=env)

    with init_distributed("cpu") as env:
        trained = lora_trainer(env, ("up_proj",))
        trained.fit()
        ckpt = trained.checkpointer.latest_valid()
        saved = dcp.FileSystemReader(str(ckpt)).read_metadata().state_dict_metadata
        model_keys = {k.removeprefix("model.") for k in saved if k.startswith("model.")}
        assert model_keys == {n for n, p in trained.model.named_parameters() if p.requires_grad}

        resumed = lora_trainer(env, ("up_proj",), resume=True)
        assert resumed.resume() and resumed.step == 2
        for (name, p), (_, q) in zip(trained.model.named_parameters(), resumed.model.named_parameters()):
            assert torch.equal(p.full_tensor(), q.full_tensor()), name

        with pytest.raises(RuntimeError, match=r"lacks 6 of its tensors \['layers.0.down_proj.lora_A'"):
            lora_trainer(env, ("down_proj",), resume=True).resume()
        full = lora_trainer(env, ("up_proj",), resume=True)
        full.model.requires_grad_(True)  # full fine-tuning cannot resume from a checkpoint without the base
        with pytest.raises(RuntimeError, match="saved without its 24 frozen parameters"):
            full.resume()
