"""Loading and saving HF-format checkpoints (config.json + safetensors, single file or sharded with an index).

Loading builds the model on the meta device (no memory), validates every tensor name and shape against the
safetensors headers of all files *before* reading any data, then materialises parameters file by file, tensor by
tensor, directly in the requested dtype/device, so peak memory is the model plus one tensor. Problems are reported
together: missing, unexpected and mis-shaped tensors, each by name and file; a truncated or corrupt file by path.
Names are mapped explicitly between the hub layout (``model.layers.*``, ``visual.*``, ``lm_head.weight``; what
we use and what we save) and the transformers-5 layout (``model.language_model.*``, ``model.visual.*``).

:func:`load_weights_sharded` fills a model that is already sharded (FSDP2 / HSDP DTensors after ``to_empty``) in
place, each rank reading only the slices of its own shards (``safe_open(...).get_slice``), with the same up-front
validation; ``engine.train.sharded.build_sharded_model`` composes it with the meta-device build (docs/scale.md).
"""

from __future__ import annotations

import json
import math
import os
import struct
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from .config import ModelConfig, load_model_config
from .model import VLModel


class CheckpointError(ValueError):
    """A checkpoint folder that cannot be loaded faithfully."""


# checkpoint-name prefix → engine-name prefix; the first match wins.
NAME_MAP: tuple[tuple[str, str], ...] = (
    ("model.language_model.", "model."),
    ("model.visual.", "visual."),
    ("language_model.model.", "model."),
    ("language_model.lm_head.", "lm_head."),
    ("model.", "model."),
    ("visual.", "visual."),
    ("lm_head.", "lm_head."),
)

_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
_DTYPE_NAMES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
}


def engine_name(checkpoint_name: str) -> str | None:
    """Map a checkpoint tensor name to our parameter name (None: not a name we know)."""
    for src, dst in NAME_MAP:
        if checkpoint_name.startswith(src):
            return dst + checkpoint_name[len(src) :]
    return None


def read_header(file: Path) -> dict[str, dict]:
    """Parse a safetensors header and check the file holds every byte it promises; name → {dtype, shape}."""
    try:
        size = file.stat().st_size
        with open(file, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise CheckpointError(f"{file}: truncated safetensors file ({size} bytes, no header)")
            (n,) = struct.unpack("<Q", raw)
            if 8 + n > size:
                raise CheckpointError(f"{file}: truncated safetensors file (header of {n} bytes, file {size} bytes)")
            header = json.loads(f.read(n))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{file}: unreadable safetensors header ({e})") from e
    header.pop("__metadata__", None)
    end = max((v["data_offsets"][1] for v in header.values()), default=0)
    if 8 + n + end > size:
        raise CheckpointError(f"{file}: truncated safetensors file (needs {8 + n + end} bytes, has {size})")
    return header


def checkpoint_files(path: Path) -> list[Path]:
    """The safetensors files of a checkpoint folder: model.safetensors, or the shards named by the index."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index}: invalid index ({e})") from e
        files = [path / f for f in sorted(set(weight_map.values()))]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(f"{index}: shard files missing: {missing}")
        return files
    single = path / "model.safetensors"
    if single.is_file():
        return [single]
    raise CheckpointError(f"{path}: no model.safetensors or model.safetensors.index.json")


def _resolve_dtype(dtype: torch.dtype | str | None, config: ModelConfig) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    name = dtype or config.torch_dtype or "float32"
    if name not in _DTYPE_NAMES:
        raise CheckpointError(f"unsupported dtype {name!r} (one of {sorted(_DTYPE_NAMES)})")
    return _DTYPE_NAMES[name]


def _checkpoint_plan(
    path: Path, expected: dict[str, tuple[int, ...]], tied: bool
) -> tuple[dict[Path, list[tuple[str, str]]], dict[str, dict]]:
    """Map every expected parameter to (file, checkpoint name), validating names and shapes against the headers of
    all files before any data is read; returns the plan and each checkpoint name's header entry."""
    files = checkpoint_files(path)
    plan: dict[Path, list[tuple[str, str]]] = {}
    infos: dict[str, dict] = {}
    seen: dict[str, str] = {}
    unexpected, misshaped, duplicate = [], [], []
    for file in files:
        for ck_name, info in read_header(file).items():
            name = engine_name(ck_name)
            if name == "lm_head.weight" and tied:
                continue  # a tied checkpoint may store the (identical) head; the embedding is the source
            if name not in expected:
                unexpected.append(f"{ck_name} ({file.name})")
                continue
            if name in seen:
                duplicate.append(f"{ck_name} ({file.name} and {seen[name]})")
                continue
            if tuple(info["shape"]) != expected[name]:
                misshaped.append(f"{ck_name} ({file.name}): checkpoint {tuple(info['shape'])}, model {expected[name]}")
                seen[name] = file.name
                continue
            if info["dtype"] not in _DTYPES:
                raise CheckpointError(f"{file}: tensor {ck_name} has unsupported dtype {info['dtype']}")
            seen[name] = file.name
            infos[ck_name] = info
            plan.setdefault(file, []).append((ck_name, name))
    missing = sorted(set(expected) - set(seen))
    if missing or unexpected or misshaped or duplicate:
        parts = [
            f"{label} ({len(items)}): {', '.join(items[:20])}{' ...' if len(items) > 20 else ''}"
            for label, items in (
                ("missing", missing),
                ("unexpected", unexpected),
                ("mis-shaped", misshaped),
                ("duplicated", duplicate),
            )
            if items
        ]
        raise CheckpointError(f"{path}: checkpoint does not match the model config; " + "; ".join(parts))
    return plan, infos


def load_weights(model: VLModel, path: str | Path, dtype: torch.dtype, device: torch.device | str) -> None:
    """Materialise every parameter of a (meta-device) model from the checkpoint at ``path``."""
    path = Path(path)
    expected = {name: tuple(p.shape) for name, p in model.named_parameters()}
    plan, _ = _checkpoint_plan(path, expected, model.config.tie_word_embeddings)
    params = dict(model.named_parameters())
    for file, names in plan.items():
        try:
            with safe_open(str(file), framework="pt", device="cpu") as f:
                for ck_name, name in names:
                    tensor = f.get_tensor(ck_name).to(device=device, dtype=dtype)
                    module_name, _, attr = name.rpartition(".")
                    module = model.get_submodule(module_name)
                    module._parameters[attr] = torch.nn.Parameter(tensor, requires_grad=params[name].requires_grad)
        except CheckpointError:
            raise
        except Exception as e:  # safetensors raises its own error types for corrupt data
            raise CheckpointError(f"{file}: cannot read tensors ({e})") from e


@dataclass
class LoadStats:
    """What one rank read in :func:`load_weights_sharded`.

    bytes_read: tensor bytes this rank asked the files for (the slices of its own shards, in the files' dtype);
    checkpoint_bytes: tensor bytes of every tensor the model loads (its share is ``checkpoint_bytes / ranks``);
    largest_slice_bytes: the largest single slice (the loader's peak temporary); seconds: wall time.
    """

    bytes_read: int = 0
    checkpoint_bytes: int = 0
    largest_slice_bytes: int = 0
    tensors: int = 0
    seconds: float = 0.0


def _local_region(param: torch.Tensor) -> tuple[torch.Tensor, tuple[slice, ...]]:
    """(this rank's storage of ``param``, the index of the global tensor it holds): a DTensor's local shard and its
    offsets on the mesh (FSDP2 / HSDP: Shard(0) on the shard dimension, Replicate on the others), or the whole
    tensor."""
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    if not isinstance(param, DTensor):
        return param.data, tuple(slice(0, n) for n in param.shape)
    shape, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)
    local = param.to_local()
    if tuple(local.shape) != tuple(shape):
        raise CheckpointError(f"unexpected local shard shape {tuple(local.shape)} (expected {tuple(shape)})")
    return local, tuple(slice(o, o + n) for o, n in zip(offset, shape))


@torch.no_grad()
def load_weights_sharded(model: nn.Module, path: str | Path, skip: Sequence[str] = ()) -> LoadStats:
    """Fill the already materialised (e.g. ``to_empty`` after ``fully_shard``) parameters of ``model`` in place from
    the checkpoint at ``path``, each rank reading only the slices of its own shards (``safe_open(...).get_slice``).

    Every parameter but those named in ``skip`` (e.g. LoRA adapters, initialised afterwards) must be in the
    checkpoint with its global shape; names and shapes are validated against all headers first. Each slice is
    read from the memory-mapped file, cast to the parameter's dtype and copied to its device, one tensor at a time:
    host memory holds at most one slice beside the shards. Returns what this rank read.
    """
    start = time.perf_counter()
    path = Path(path)
    skip_set = set(skip)
    params = {name: p for name, p in model.named_parameters() if name not in skip_set}
    expected = {name: tuple(p.shape) for name, p in params.items()}
    tied = bool(getattr(getattr(model, "config", None), "tie_word_embeddings", False))
    plan, infos = _checkpoint_plan(path, expected, tied)
    stats = LoadStats()
    for file, names in plan.items():
        try:
            with safe_open(str(file), framework="pt", device="cpu") as f:
                for ck_name, name in names:
                    info = infos[ck_name]
                    itemsize = torch.empty((), dtype=_DTYPES[info["dtype"]]).element_size()
                    stats.checkpoint_bytes += math.prod(info["shape"]) * itemsize
                    local, index = _local_region(params[name])
                    stats.tensors += 1
                    if local.numel() == 0:
                        continue  # an uneven split left this rank no rows of a short tensor
                    if not index:  # a 0-d tensor
                        piece = f.get_tensor(ck_name)
                    else:
                        piece = f.get_slice(ck_name)[index]
                    nbytes = piece.numel() * itemsize
                    stats.bytes_read += nbytes
                    stats.largest_slice_bytes = max(stats.largest_slice_bytes, nbytes)
                    local.copy_(piece)
                    del piece
        except CheckpointError:
            raise
        except Exception as e:  # safetensors raises its own error types for corrupt data
            raise CheckpointError(f"{file}: cannot read tensors ({e})") from e
    stats.seconds = time.perf_counter() - start
    return stats


def from_pretrained(
    path: str | Path, dtype: torch.dtype | str | None = None, device: torch.device | str | None = None
) -> VLModel:
    """Load a Qwen2.5-VL checkpoint folder. dtype None → the config's ``torch_dtype`` (float32 if absent);
    device None → CPU. Returns the model in eval mode."""
    path = Path(path)
    config = load_model_config(path)
    torch_dtype = _resolve_dtype(dtype, config)
    device = torch.device(device or "cpu")
    with torch.device("meta"):
        model = VLModel(config)
    load_weights(model, path, torch_dtype, device)
    return model.eval()


def save_pretrained(model: VLModel, path: str | Path, max_shard_bytes: int = 4 << 30) -> Path:
    """Write config.json and the weights (hub names; sharded with an index above ``max_shard_bytes``)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    state = {name: p.detach() for name, p in model.named_parameters()}
    dtypes = {t.dtype for t in state.values()}
    config = model.config.to_hf_dict()
    if len(dtypes) == 1:
        config["torch_dtype"] = str(next(iter(dtypes))).removeprefix("torch.")
    (path / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in state.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t.to("cpu").contiguous()
        size += nbytes
    for stale in path.glob("model*.safetensors*"):
        os.remove(stale)
    if len(shards) == 1:
        save_file(shards[0], str(path / "model.safetensors"), metadata={"format": "pt"})
        return path
    weight_map = {}
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(path / fname), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, fname))
    total = sum(t.numel() * t.element_size() for t in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return path
