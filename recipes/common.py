"""Plumbing shared by the SIF recipes: resolve the checkpoint, load records, build the policy, export, summarise.

Kept out of the recipe scripts so each of them reads top to bottom as "config, data, model, objective, train".
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn
from torch.distributed.fsdp import FSDPModule

from engine.config import ConfigError, DataConfig, LoRAConfig, ModelSection, TrainConfig
from engine.data import bundled_dataset_dir
from engine.data.schema import RecordList, load_records
from engine.data.synth import SynthSplit, ensure_split
from engine.distributed import DistEnv, parallelize
from engine.models import (
    ModelConfig,
    Processor,
    VLModel,
    create_tiny_checkpoint,
    from_pretrained,
    processor_from_pretrained,
)
from engine.train.lora import apply_lora, freeze_vision_tower
from engine.train.metrics import read_metrics
from engine.train.sharded import build_sharded_model, sharded_frozen_copy

TINY_DIRNAME = "tiny-model"


def resolve_checkpoint(path: str, output_dir: str, env: DistEnv) -> Path:
    """``path``, or (empty) the tiny embedded default, written once by rank 0 under ``output_dir``."""
    if path:
        if not Path(path).is_dir():
            raise ConfigError(f"model.path {path!r} is not a checkpoint folder")
        return Path(path)
    tiny = Path(output_dir) / TINY_DIRNAME
    if env.is_main and not (tiny / "config.json").is_file():
        create_tiny_checkpoint(tiny, seed=0)
    env.barrier()
    return tiny


def generated_split(split: SynthSplit, output_dir: str, env: DistEnv) -> str:
    """The folder of a generated split under ``output_dir/data`` (rank 0 renders it once; the others wait)."""
    if env.is_main:
        ensure_split(Path(output_dir) / "data", split)
    env.barrier()
    return str(Path(output_dir) / "data" / split.folder_name())


def load_split(path: str, split: str, limit: int = 0, max_skip_share: float = 1.0) -> RecordList:
    """Records from ``path`` (a records.jsonl or a folder holding one), or the bundled ``split``, with the load's
    SkipReport (``.report``, which the datasets add decode-time skips to); raises if empty or if more than
    ``max_skip_share`` of the records were skipped (SkipLimitError, with the list)."""
    if path:
        file = Path(path) / "records.jsonl" if Path(path).is_dir() else Path(path)
        if not file.is_file():
            raise ConfigError(f"data path {path!r}: no such file ({file})")
    else:
        file = bundled_dataset_dir(split) / "records.jsonl"
    records, report = load_records(file)
    if not records:
        raise ValueError(f"{file}: no usable records ({report.summary()})")
    report.check_share(max_skip_share)
    return RecordList(records[:limit] if limit > 0 else records, report)


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


def hf_exporter(config: ModelConfig, processor: Processor) -> Callable[[Path], None]:
    """Trainer export hook: the tokenizer/preprocessor files beside the streamed weights and config.json, i.e. a
    folder ``from_pretrained`` (and transformers) can load."""
    del config  # the export writes config.json itself

    def write(out_dir: Path) -> None:
        processor.save(out_dir)

    return write


def window_means(metrics_path: Path, keys: Sequence[str], window: int) -> tuple[dict[str, float], dict[str, float]]:
    """Means of ``keys`` over the first and the last ``window`` logged steps (NaN where a key is absent)."""
    rows = read_metrics(metrics_path)

    def mean(part: list[dict], key: str) -> float:
        vals = [float(r[key]) for r in part if isinstance(r.get(key), (int, float))]
        return sum(vals) / len(vals) if vals else math.nan

    first, last = rows[:window], rows[-window:]
    return {k: mean(first, k) for k in keys}, {k: mean(last, k) for k in keys}
