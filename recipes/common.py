"""Plumbing shared by the SIF recipes: resolve the checkpoint, load records, build the policy, export, summarise.

Kept out of the recipe scripts so each of them reads top to bottom as "config, data, model, objective, train".
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from engine.config import ConfigError, DataConfig, LoRAConfig
from engine.config import ModelConfig as ModelSection
from engine.data import bundled_dataset_dir
from engine.data.schema import RecordList, load_records
from engine.data.synth import SynthSplit, ensure_split
from engine.distributed import DistEnv
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


def load_policy(
    checkpoint: Path, model_cfg: ModelSection, lora_cfg: LoRAConfig, data_cfg: DataConfig, seed: int
) -> tuple[VLModel, Processor]:
    """The model with LoRA applied (or the vision tower frozen for full fine-tuning) and its processor.

    Trainable parameters load in fp32 (the optimiser's master copy; FSDP2 computes in bf16 on GPU); a LoRA base
    may load in bf16 with ``model.dtype bfloat16``. The processor's pixel budget comes from the data section.
    """
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


def frozen_copy(model: nn.Module) -> nn.Module:
    """A frozen deep copy (the reference policy of full fine-tuning); call before the policy is sharded."""
    ref = copy.deepcopy(model)
    for p in ref.parameters():
        p.requires_grad_(False)
    return ref.eval()


def hf_exporter(config: ModelConfig, processor: Processor) -> Callable[[dict[str, torch.Tensor], Path], None]:
    """Trainer export hook: merged weights as model.safetensors + config.json + tokenizer/preprocessor files,
    i.e. a folder ``from_pretrained`` (and transformers) can load."""

    def write(state: dict[str, torch.Tensor], out_dir: Path) -> None:
        tensors = {k: v.contiguous() for k, v in state.items() if not k.startswith("rope_")}
        hf = config.to_hf_dict()
        dtypes = {t.dtype for t in tensors.values()}
        if len(dtypes) == 1:
            hf["torch_dtype"] = str(next(iter(dtypes))).removeprefix("torch.")
        (out_dir / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
        save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
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
