"""Sharded, atomic, resumable checkpoints with torch.distributed.checkpoint (DCP), and the HF safetensors export.

Layout of ``<run>/checkpoints/step_00000012/``:

* ``*.distcp`` + ``.metadata`` — DCP shards of ``{"model": ..., "optim": ...}`` from ``get_state_dict`` (each rank
  writes its own shards; loading on another world size reshards);
* ``trainer_state.json`` — step, scheduler, data position, skip counters (rank 0);
* ``rng_rank{r}.safetensors`` — each rank's torch / CUDA / Python / NumPy RNG states;
* ``manifest.json`` — written last, after a barrier: every file's name and size.

A checkpoint is written to ``step_N.tmp`` and renamed to ``step_N`` only once complete, so a crash never leaves a
``step_N`` that looks finished. On resume, the newest ``step_N`` whose manifest exists and whose files all exist
with the recorded sizes is loaded; newer incomplete or truncated ones are reported by name and skipped.
Only the last ``keep_last`` complete checkpoints are kept. Frozen parameters (a LoRA base, a frozen vision
tower) are not saved unless ``save_frozen``: they are the base checkpoint's, which the run loads again before
resuming; their names are recorded, and a resume whose model freezes a different set is refused.
Resume on the same world size is bit-for-bit (model, optimiser, schedule, data order and RNG streams all
restored); on another world size the tensors reshard and the RNG streams are re-seeded (with a warning).
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file, save_file
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)

from engine.distributed import DistEnv, broadcast_object

MANIFEST = "manifest.json"
TRAINER_STATE = "trainer_state.json"
_STEP_DIR = re.compile(r"^step_(\d+)$")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_durable(path: Path, text: str) -> None:
    with path.open("w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())


def checkpoint_problem(path: Path) -> str | None:
    """Why the checkpoint directory ``path`` cannot be loaded, or None if it is complete."""
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        return f"no {MANIFEST} (the save did not finish)"
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        return f"unreadable {MANIFEST}: {exc}"
    for name, size in files.items():
        file = path / name
        if not file.is_file():
            return f"missing file {name}"
        actual = file.stat().st_size
        if actual != size:
            return f"{name} is {actual} bytes, expected {size} (truncated or corrupt)"
    return None


class Checkpointer:
    """Saves / finds / loads checkpoints under ``root`` (collective calls: every rank must call them)."""

    def __init__(self, root: str | Path, keep_last: int, env: DistEnv, save_frozen: bool = False) -> None:
        if keep_last < 1:
            raise ValueError(f"keep_last must be >= 1, got {keep_last}")
        self.root = Path(root)
        self.keep_last = keep_last
        self.env = env
        self.save_frozen = save_frozen

    def _options(self) -> StateDictOptions:
        return StateDictOptions(ignore_frozen_params=not self.save_frozen, strict=self.save_frozen)

    def _frozen_names(self, model: nn.Module) -> list[str]:
        return [] if self.save_frozen else sorted(n for n, p in model.named_parameters() if not p.requires_grad)

    def step_dirs(self) -> list[tuple[int, Path]]:
        """(step, path) of every finished-looking ``step_N`` directory, newest first."""
        if not self.root.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.root.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
        return sorted(found, reverse=True)

    def save(self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer, trainer_state: dict) -> Path:
        """Write checkpoint ``step`` atomically; returns its final directory."""
        final = self.root / f"step_{step:08d}"
        tmp = self.root / f"step_{step:08d}.tmp"
        if self.env.is_main:
            self.root.mkdir(parents=True, exist_ok=True)
            for stale in self.root.glob("step_*.tmp"):
                shutil.rmtree(stale)
            tmp.mkdir()
        dist.barrier()
        model_sd, optim_sd = get_state_dict(model, optimizer, options=self._options())
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp))
        save_file(_rng_state(), str(tmp / f"rng_rank{self.env.rank}.safetensors"))
        if self.env.is_main:
            state = dict(trainer_state, world_size=self.env.world_size, frozen_not_saved=self._frozen_names(model))
            _write_durable(tmp / TRAINER_STATE, json.dumps(state, indent=1))
        dist.barrier()
        if self.env.is_main:
            files = {p.name: p.stat().st_size for p in sorted(tmp.iterdir()) if p.is_file()}
            _write_durable(tmp / MANIFEST, json.dumps({"step": step, "files": files}, indent=1))
            _fsync_dir(tmp)
            if final.exists():  # re-saving a step after a resume: replace it
                shutil.rmtree(final)
            os.replace(tmp, final)
            _fsync_dir(self.root)
            self._prune()
        dist.barrier()
        return final

    def _prune(self) -> None:
        """Keep the newest ``keep_last`` complete checkpoints; remove older ones and any broken directory."""
        kept = 0
        for _, path in self.step_dirs():
            problem = checkpoint_problem(path)
            if problem is not None:
                warnings.warn(f"removing unusable checkpoint {path.name} ({problem})", stacklevel=3)
            elif kept < self.keep_last:
                kept += 1
                continue
            shutil.rmtree(path)

    def latest_valid(self) -> Path | None:
        """Rank 0 picks the newest complete checkpoint (warning about each newer broken one); all ranks agree."""
        chosen = None
        if self.env.is_main:
            broken = []
            for _, path in self.step_dirs():
                problem = checkpoint_problem(path)
                if problem is None:
                    chosen = path
                    break
                broken.append(f"{path.name} ({problem})")
            if broken:
                fallback = chosen.name if chosen else "none, starting fresh"
                warnings.warn(f"skipping unusable checkpoint(s) {'; '.join(broken)}; using {fallback}", stacklevel=2)
        chosen = broadcast_object(str(chosen) if chosen else None)
        return Path(chosen) if chosen else None

    def load_latest(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any] | None:
        """Restore model, optimiser and RNG from the newest valid checkpoint; returns its trainer state."""
        path = self.latest_valid()
        if path is None:
            return None
        return self.load(path, model, optimizer)

    def load(self, path: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None) -> dict[str, Any]:
        """Restore from the checkpoint directory ``path`` (resharding if the world size changed)."""
        trainer_state = json.loads((path / TRAINER_STATE).read_text())
        not_saved = trainer_state.get("frozen_not_saved", [])
        frozen_now = sorted(n for n, p in model.named_parameters() if not p.requires_grad)
        if not_saved and not_saved != frozen_now:
            raise RuntimeError(
                f"{path} was saved without its {len(not_saved)} frozen parameters (e.g. {not_saved[0]}), but this "
                f"model freezes {len(frozen_now)} others: resume with the same base model and LoRA / freeze setup"
            )
        options = StateDictOptions(ignore_frozen_params=bool(not_saved), strict=not not_saved)
        if optimizer is None:
            state = {"model": get_model_state_dict(model, options=options)}
            _check_model_keys(path, state["model"])
            dcp.load(state, checkpoint_id=str(path))
            set_model_state_dict(model, state["model"], options=options)
        else:
            model_sd, optim_sd = get_state_dict(model, optimizer, options=options)
            _check_model_keys(path, model_sd)
            state = {"model": model_sd, "optim": optim_sd}
            dcp.load(state, checkpoint_id=str(path))
            set_state_dict(
                model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"], options=options
            )
        rng_file = path / f"rng_rank{self.env.rank}.safetensors"
        if trainer_state.get("world_size") == self.env.world_size and rng_file.is_file():
            _set_rng_state(load_file(str(rng_file)))
        elif self.env.is_main:
            warnings.warn(
                f"{path.name} was saved with world size {trainer_state.get('world_size')}, this run has "
                f"{self.env.world_size}: tensors resharded, RNG streams not restored",
                stacklevel=2,
            )
        return trainer_state


def _check_model_keys(path: Path, model_sd: dict[str, Any]) -> None:
    """Refuse, naming the tensors, a checkpoint whose model tensors differ from the model's (before any load)."""
    saved = {k.removeprefix("model.") for k in dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata}
    saved = {k for k in saved if not k.startswith("optim.")}
    missing = sorted(set(model_sd) - saved)
    extra = sorted(saved - set(model_sd))
    if missing or extra:
        raise RuntimeError(
            f"{path} does not match this model: it lacks {len(missing)} of its tensors {missing[:3]} and holds "
            f"{len(extra)} it does not have {extra[:3]} (different architecture, LoRA targets or freezing?)"
        )


def _rng_state() -> dict[str, torch.Tensor]:
    """This process's RNG states as tensors (safetensors-storable; no pickle)."""
    py_version, py_state, py_gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()  # noqa: NPY002 (the global stream)
    state = {
        "torch_cpu": torch.get_rng_state(),
        "python_state": torch.tensor(py_state, dtype=torch.int64),
        "python_meta": torch.tensor([py_version, py_gauss is not None], dtype=torch.int64),
        "python_gauss": torch.tensor([py_gauss or 0.0], dtype=torch.float64),
        "numpy_keys": torch.from_numpy(np_keys.astype(np.int64)),
        "numpy_meta": torch.tensor([np_pos, np_has_gauss], dtype=torch.int64),
        "numpy_gauss": torch.tensor([np_gauss], dtype=torch.float64),
    }
    if np_name != "MT19937":
        raise RuntimeError(f"unsupported NumPy bit generator {np_name}")
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["torch_cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(state["torch_cpu"])
    if "torch_cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["torch_cuda"])
    version, has_gauss = state["python_meta"].tolist()
    gauss = state["python_gauss"].item() if has_gauss else None
    random.setstate((version, tuple(state["python_state"].tolist()), gauss))
    pos, np_has_gauss = state["numpy_meta"].tolist()
    keys = state["numpy_keys"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", keys, pos, np_has_gauss, state["numpy_gauss"].item()))  # noqa: NPY002


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The unsharded state dict on CPU on rank 0 (empty on other ranks); collective."""
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def _export_items(model: nn.Module) -> list[tuple[str, nn.Module, str]]:
    """(name in the export, module, what to emit) in the model's parameter order: ``"param:<attr>"`` for a plain
    parameter, ``"merged"`` for a LoRA module's weight with its adapter folded in; adapters themselves are not
    exported and a parameter shared by several modules (tied weights) is exported once, under its first name."""
    from engine.train.lora import LoRALinear

    items, seen = [], set()
    for module_name, module in model.named_modules():
        prefix = f"{module_name}." if module_name else ""
        for attr, param in module.named_parameters(recurse=False):
            if id(param) in seen or (isinstance(module, LoRALinear) and attr in ("lora_A", "lora_B")):
                continue
            seen.add(id(param))
            kind = "merged" if isinstance(module, LoRALinear) and attr == "weight" else f"param:{attr}"
            items.append((prefix + attr, module, kind))
    return items


def _gather(param: torch.Tensor) -> torch.Tensor:
    """The full tensor of a (DTensor) parameter on every rank; collective for a DTensor."""
    from torch.distributed.tensor import DTensor

    return param.full_tensor() if isinstance(param, DTensor) else param.detach()


def export_hf(
    model: nn.Module,
    out_dir: str | Path,
    *,
    env: DistEnv,
    dtype: torch.dtype | None = torch.bfloat16,
    max_shard_bytes: int = 4 << 30,
    write_extra: Callable[[Path], None] | None = None,
) -> Path:
    """Stream the LoRA-merged weights into HF safetensors, one parameter at a time; collective.

    Nothing gathers the whole model: the files are planned from the parameters' global shapes (greedy, in
    parameter order, at most ``max_shard_bytes`` each), then each parameter is all-gathered from its shards
    (``DTensor.full_tensor``, one at a time), a LoRA module's weight merged there with its adapter
    (``W + (α/r) B A`` in fp32), cast to ``dtype`` (None: as stored) and, on rank 0, moved to the host into the
    current file, which is written as soon as its last tensor arrives. Memory: one full parameter per rank (on its
    device) and one file's tensors on rank 0's host. Layout as transformers writes it: ``model.safetensors``, or
    ``model-0000i-of-0000N.safetensors`` + ``model.safetensors.index.json`` (``metadata.total_size``,
    ``weight_map``). Names are the model's parameter names (for an engine VLModel the hub names); an engine VLModel
    also gets its ``config.json`` (with ``torch_dtype``). ``write_extra(out_dir)`` then writes other files on rank 0
    (tokenizer, preprocessor).
    """
    from engine.train.lora import LoRALinear

    out_dir = Path(out_dir)
    items = _export_items(model)
    params = {name: getattr(module, "weight" if kind == "merged" else kind[6:]) for name, module, kind in items}

    def out_dtype(t: torch.Tensor) -> torch.dtype:
        return dtype if (dtype is not None and t.is_floating_point()) else t.dtype

    sizes = {
        name: math.prod(p.shape) * torch.empty((), dtype=out_dtype(p)).element_size() for name, p in params.items()
    }
    files: list[list[str]] = [[]]
    filled = 0
    for name, _, _ in items:
        if files[-1] and filled + sizes[name] > max_shard_bytes:
            files.append([])
            filled = 0
        files[-1].append(name)
        filled += sizes[name]
    names = (
        ["model.safetensors"]
        if len(files) == 1
        else [f"model-{i + 1:05d}-of-{len(files):05d}.safetensors" for i in range(len(files))]
    )
    file_of = {name: i for i, group in enumerate(files) for name in group}
    if env.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        for stale in out_dir.glob("model*.safetensors*"):
            stale.unlink()
    dist.barrier()
    pending: dict[str, torch.Tensor] = {}
    for name, module, kind in items:
        if kind == "merged":
            assert isinstance(module, LoRALinear)
            weight, a, b = _gather(module.weight), _gather(module.lora_A), _gather(module.lora_B)
            tensor = weight.float() + (b.float() @ a.float()) * module.scaling if env.is_main else None
            del weight, a, b
        else:
            tensor = _gather(params[name])
        if not env.is_main:
            del tensor
            continue
        pending[name] = tensor.to(out_dtype(params[name])).to("cpu").contiguous()
        del tensor
        i = file_of[name]
        if name == files[i][-1]:
            save_file(pending, str(out_dir / names[i]), metadata={"format": "pt"})
            pending.clear()
    if env.is_main:
        if len(files) > 1:
            index = {
                "metadata": {"total_size": sum(sizes.values())},
                "weight_map": {name: names[file_of[name]] for name, _, _ in items},
            }
            (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        config = getattr(model, "config", None)
        if hasattr(config, "to_hf_dict"):
            hf = config.to_hf_dict()
            stored = {out_dtype(p) for p in params.values() if p.is_floating_point()}
            if len(stored) == 1:
                hf["torch_dtype"] = str(next(iter(stored))).removeprefix("torch.")
            (out_dir / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
        if write_extra is not None:
            write_extra(out_dir)
    dist.barrier()
    return out_dir
