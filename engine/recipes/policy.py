"""The policy of the SIF jobs: resolve the checkpoint, build the model (sharded or not) and its processor, the
frozen reference of full fine-tuning, and the export hook that writes the processor files beside the weights."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from torch.distributed.fsdp import FSDPModule

from engine.config import ConfigError, DataConfig, LoRAConfig, ModelSection, TrainConfig
from engine.data.schema import load_records
from engine.data.synth import SynthSplit, ensure_split
from engine.distributed import DistEnv, parallelize
from engine.models import (
    Processor,
    VLModel,
    create_tiny_checkpoint,
    from_pretrained,
    processor_from_pretrained,
)
from engine.models.config import load_model_config
from engine.models.loading import save_pretrained
from engine.models.tiny import tiny_config
from engine.train.lora import apply_lora, freeze_vision_tower
from engine.train.sharded import build_sharded_model, sharded_frozen_copy
from engine.train.vision_align import AlignConfig, align_vision_tower

TINY_DIRNAME = "tiny-model"
ALIGN_SEED = 900
"""Seed of the vision-alignment scenes: apart from the bundled splits' and the recipes' generated ones."""


def tiny_dirname(model_cfg: ModelSection) -> str:
    """The tiny default's folder name, one per alignment setting (a changed setting builds a new one)."""
    if model_cfg.align_steps <= 0:
        return TINY_DIRNAME
    placed = f"-position{model_cfg.align_position_weight:g}" if model_cfg.align_position_weight else ""
    lr = f"-lr{model_cfg.align_lr:g}" if model_cfg.align_lr != ModelSection.align_lr else ""
    balanced = "-balanced" if model_cfg.align_balanced else ""
    return f"{TINY_DIRNAME}-aligned{model_cfg.align_steps}x{model_cfg.align_scenes}{placed}{lr}{balanced}"


def create_default_checkpoint(
    path: Path, model_cfg: ModelSection, output_dir: str, device: torch.device | str = "cpu"
) -> None:
    """Write the tiny default to ``path``: random weights, then (``align_steps`` > 0) its vision tower aligned on
    generated scenes, on ``device``. Built in a sibling folder and renamed when complete, so a killed build is
    redone."""
    partial = path.with_name(path.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    create_tiny_checkpoint(partial, seed=0)
    if model_cfg.align_steps > 0:
        split = SynthSplit(records=model_cfg.align_scenes, seed=ALIGN_SEED, per_scene=1, qtypes="locate")
        scenes = ensure_split(Path(output_dir) / "data", split)
        records, _ = load_records(scenes / "records.jsonl", check_files="none")
        model, processor = from_pretrained(partial).to(device), processor_from_pretrained(partial)
        threads = torch.get_num_threads()
        torch.set_num_threads(os.cpu_count() or threads)  # the other ranks wait at the barrier meanwhile
        try:
            cfg = AlignConfig(
                steps=model_cfg.align_steps,
                lr=model_cfg.align_lr,
                position_weight=model_cfg.align_position_weight,
                balanced=model_cfg.align_balanced,
            )
            report = align_vision_tower(model, processor, records, cfg)
        finally:
            torch.set_num_threads(threads)
        losses = report["losses"]
        print(
            f"[align] tiny vision tower: {len(losses)} steps on {len(records)} scenes in {report['seconds']} s, "
            f"loss {losses[0]:.3f} -> {losses[-1]:.3f}",
            flush=True,
        )
        save_pretrained(model.cpu(), partial)
    shutil.rmtree(path, ignore_errors=True)
    partial.rename(path)


def default_is_current(path: Path) -> bool:
    """Whether ``path`` holds a complete tiny default of this version's ``tiny_config`` (a folder an older version
    built, e.g. with another rotary base, is rebuilt, not silently trained on)."""
    if not (path / "config.json").is_file():
        return False
    if load_model_config(path) == tiny_config():
        return True
    print(f"[model] {path} holds a tiny default of another configuration; building it again", flush=True)
    return False


def resolve_checkpoint(model_cfg: ModelSection, output_dir: str, env: DistEnv) -> Path:
    """``model_cfg.path``, or (empty) the tiny embedded default, written once by rank 0 under ``output_dir``."""
    if model_cfg.path:
        if not Path(model_cfg.path).is_dir():
            raise ConfigError(f"model.path {model_cfg.path!r} is not a checkpoint folder")
        return Path(model_cfg.path)
    tiny = Path(output_dir) / tiny_dirname(model_cfg)
    if env.is_main and not default_is_current(tiny):
        create_default_checkpoint(tiny, model_cfg, output_dir, env.device)
    env.barrier()
    return tiny


def storage_dtype(model_cfg: ModelSection, device: torch.device) -> torch.dtype:
    """Storage of frozen weights (a LoRA base, a frozen vision tower, the full-fine-tuning reference): bf16 with
    ``model.dtype bfloat16``, and on CUDA under ``auto`` too (FSDP2 computes in bf16 there, so a bf16 copy of a
    frozen weight gives the same numbers at half the memory); fp32 otherwise."""
    if model_cfg.dtype == "bfloat16" or (model_cfg.dtype == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return torch.float32


def load_policy(
    checkpoint: Path,
    model_cfg: ModelSection,
    lora_cfg: LoRAConfig,
    data_cfg: DataConfig,
    seed: int,
    env: DistEnv | None = None,
    train_cfg: TrainConfig | None = None,
) -> tuple[VLModel, Processor]:
    """The model with LoRA applied (or the vision tower frozen for full fine-tuning) and its processor.

    With ``env``: built sharded from the start (``engine.train.sharded.build_sharded_model``: meta device →
    FSDP2 over ``env.data_parallel_mesh(train_cfg.dp_replicate)`` → ``to_empty`` on ``env.device`` → each rank
    reads only its shards' slices of the checkpoint), with ``train_cfg``'s activation checkpointing and
    resharding, ready for the Trainer; the load's figures are in ``model.load_stats``. Without: an unsharded model
    on the CPU (for single-process tools). Trainable parameters are fp32 (the optimiser's master copy); frozen
    ones are stored in :func:`storage_dtype`. The processor's pixel budget comes from the data section.
    """
    if env is not None:
        train_cfg = train_cfg or TrainConfig()
        model, stats = build_sharded_model(
            checkpoint,
            env.data_parallel_mesh(train_cfg.dp_replicate),
            env.device,
            lora=lora_cfg if lora_cfg.enabled else None,
            freeze_vision=lora_cfg.freeze_vision,
            frozen_dtype=storage_dtype(model_cfg, env.device),
            activation_checkpointing=train_cfg.activation_checkpointing,
            reshard_after_forward=train_cfg.reshard_after_forward,
            seed=seed,
        )
        model.load_stats = stats
    else:
        base_dtype = torch.bfloat16 if (model_cfg.dtype == "bfloat16" and lora_cfg.enabled) else torch.float32
        model = from_pretrained(checkpoint, dtype=base_dtype)
        if lora_cfg.enabled:
            apply_lora(model, lora_cfg, seed=seed)
        elif lora_cfg.freeze_vision:
            freeze_vision_tower(model)
    processor = processor_from_pretrained(checkpoint)
    processor.image.min_pixels = data_cfg.min_pixels
    processor.image.max_pixels = data_cfg.max_pixels
    return model, processor


def frozen_copy(
    model: nn.Module, env: DistEnv, model_cfg: ModelSection | None = None, train_cfg: TrainConfig | None = None
) -> nn.Module:
    """The frozen reference policy of full fine-tuning, sharded like the policy: each rank copies its own shards of
    ``model`` (sharded with ``load_policy(..., env=env)``; an unsharded one is sharded here first) in
    :func:`storage_dtype`. It shares nothing with the policy and costs its own shards (bf16 on GPU); call before
    training changes the policy."""
    mesh = env.data_parallel_mesh((train_cfg or TrainConfig()).dp_replicate)
    if not isinstance(model, FSDPModule):
        model = parallelize(model, mesh)
    return sharded_frozen_copy(model, mesh, storage_dtype(model_cfg or ModelSection(), env.device))


def hf_exporter(processor: Processor) -> Callable[[Path], None]:
    """Trainer export hook: the tokenizer/preprocessor files beside the streamed weights and config.json (which
    the export writes itself), i.e. a folder ``from_pretrained`` (and transformers) can load."""

    def write(out_dir: Path) -> None:
        processor.save(out_dir)

    return write
