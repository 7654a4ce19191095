"""Sharded, atomic, verified, resumable checkpoints with torch.distributed.checkpoint (DCP), and the HF export.

Layout of ``<run>/checkpoints/step_00000012/``:

* ``*.distcp`` + ``.metadata`` — DCP shards of ``{"model": ..., "optim": ...}`` from ``get_state_dict`` (each rank
  writes its own shards; loading on another world size reshards);
* ``trainer_state.json`` — step, scheduler, data position, skip counters, the run's config and global batch
  (rank 0);
* ``rng_rank{r}.safetensors`` — each rank's torch / CUDA / Python / NumPy RNG states;
* ``manifest.json`` — written last, after a barrier: every file's name, size and SHA-256 (the ranks hash their
  share of the files in parallel), written to a temporary name and renamed.

A checkpoint is written to ``step_N.tmp`` and renamed to ``step_N`` only once complete, so a crash never leaves a
``step_N`` that looks finished. On resume the newest ``step_N`` whose manifest exists and whose every file has
the recorded size and checksum (verified in parallel by the ranks) is loaded; a newer one that fails the
verification *or* the load itself is reported by name, with the file at fault, and the next older one tried.
Nothing in a checkpoint folder can run code: DCP's ``.metadata`` (a pickle) is read by a restricted unpickler
admitting only DCP's metadata classes, torch dtypes / sizes / layouts and plain containers, and DCP's pickled
non-tensor entries (optimiser hyper-parameters) are read with ``torch.load(weights_only=True)``.
Only the last ``keep_last`` complete checkpoints are kept; a broken one is never deleted but renamed
``step_N.broken`` (with a warning) so that it can be inspected. Frozen parameters (a LoRA base, a frozen vision
tower) are not saved unless ``save_frozen``: they are the base checkpoint's, which the run loads again before
resuming; their names are recorded, and a resume whose model freezes a different set is refused.
Resume on the same world size is bit-for-bit (model, optimiser, schedule, data order and RNG streams all
restored); on another world size the tensors reshard and the RNG streams are re-seeded (with a warning).
See docs/robustness.md for what is verified and what a resume applies or refuses.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import pickle
import random
import re
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file, save_file
from torch import nn
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)

from engine.config import ConfigError
from engine.distributed import DistEnv, broadcast_object

MANIFEST = "manifest.json"
TRAINER_STATE = "trainer_state.json"
MANIFEST_FORMAT = 2  # 1: sizes only (older checkpoints, still loaded, with a warning); 2: sizes + SHA-256
_STEP_DIR = re.compile(r"^step_(\d+)$")
_HASH_CHUNK = 16 << 20


class ResumeError(ConfigError):
    """``--resume`` is refused (every checkpoint broken, or a config change that cannot be applied). Nothing has
    been changed on disk. A ConfigError, so that a recipe prints it without a traceback."""


class CheckpointMismatch(RuntimeError):
    """The checkpoint is intact but does not fit this model (other architecture, LoRA targets or freezing)."""


class UnsafeCheckpointError(pickle.UnpicklingError):
    """A checkpoint's pickled metadata refers to something other than DCP metadata and plain data."""


# ---------------------------------------------------------------------------------------------------------------
# nothing from a checkpoint folder runs code

_ALLOWED_GLOBALS = {
    "torch.distributed.checkpoint.metadata": {
        "Metadata", "MetadataIndex", "StorageMeta", "TensorProperties", "TensorStorageMetadata",
        "BytesStorageMetadata", "ChunkStorageMetadata", "_MEM_FORMAT_ENCODING",
    },
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},  # a torch.layout by name, from a fixed table
    "torch": {"Size"},  # and torch dtypes, checked by type below
    "pathlib": {"Path", "PosixPath", "WindowsPath", "PurePath", "PurePosixPath", "PureWindowsPath"},
    "collections": {"OrderedDict"},
    "builtins": {"dict", "list", "tuple", "set", "frozenset", "bytes", "bytearray", "str", "int", "float", "bool",
                 "complex"},
}  # fmt: skip


class _MetadataUnpickler(pickle.Unpickler):
    """Admits only DCP's metadata classes, torch dtypes / sizes / layouts and plain containers."""

    def find_class(self, module: str, name: str) -> Any:
        if name in _ALLOWED_GLOBALS.get(module, ()):
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise UnsafeCheckpointError(f"refusing to load {module}.{name} (not DCP metadata or plain data)")

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafeCheckpointError("refusing a persistent id")


def load_dcp_metadata(stream: BinaryIO) -> Metadata:
    """Unpickle a DCP ``.metadata`` stream with the restricted unpickler."""
    metadata = _MetadataUnpickler(stream).load()
    if not isinstance(metadata, Metadata):
        raise UnsafeCheckpointError(f"a DCP .metadata must hold a Metadata object, got {type(metadata).__name__}")
    return metadata


class SafeFileSystemReader(dcp.FileSystemReader):
    """DCP's FileSystemReader, with ``.metadata`` read by the restricted unpickler instead of ``pickle.load``."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        name = ".metadata" if kwargs.get("rank") is None else f"__{kwargs['rank']}.metadata"
        with self.fs.create_stream(self.fs.concat_path(self.path, name), "rb") as stream:
            metadata = load_dcp_metadata(stream)
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's default load planner, with pickled non-tensor entries read by ``torch.load(weights_only=True)``."""

    def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
        obj = torch.load(value, weights_only=True)
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj


# ---------------------------------------------------------------------------------------------------------------
# files


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_durable(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically (a temporary name, fsync, rename)."""
    tmp = path.with_name(path.name + ".partial")
    with tmp.open("w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _all_gather(obj: Any) -> list[Any]:
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _read_manifest(path: Path) -> tuple[dict[str, dict[str, Any]] | None, str | None]:
    """(files: name -> {"size", "sha256"?}, problem)."""
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        return None, f"no {MANIFEST} (the save did not finish)"
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
        out = {}
        for name, entry in files.items():
            entry = {"size": entry} if isinstance(entry, int) else dict(entry)
            if not isinstance(entry.get("size"), int) or Path(name).name != name:
                raise ValueError(f"bad entry for {name!r}")
            out[name] = entry
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as exc:
        return None, f"unreadable {MANIFEST}: {exc}"
    return out, None


def _size_problem(path: Path, name: str, entry: dict[str, Any]) -> str | None:
    file = path / name
    if not file.is_file():
        return f"missing file {name}"
    actual = file.stat().st_size
    if actual != entry["size"]:
        return f"{name} is {actual} bytes, expected {entry['size']} (truncated or corrupt)"
    return None


def _checksum_problem(path: Path, name: str, entry: dict[str, Any]) -> str | None:
    problem = _size_problem(path, name, entry)
    if problem is None and "sha256" in entry and file_sha256(path / name) != entry["sha256"]:
        problem = f"{name} does not match its checksum in {MANIFEST} (corrupt)"
    return problem


def checkpoint_problem(path: Path, *, checksums: bool = False) -> str | None:
    """Why the checkpoint directory ``path`` cannot be loaded, or None if it is complete.

    Sizes only by default (cheap); ``checksums=True`` also hashes every file (what a resume does, in parallel).
    """
    files, problem = _read_manifest(path)
    if problem is not None:
        return problem
    check = _checksum_problem if checksums else _size_problem
    for name, entry in files.items():
        if (problem := check(path, name, entry)) is not None:
            return problem
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
        self.broken: dict[str, str] = {}  # step dir name -> why it could not be used (found by verify / load)

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
        names = sorted(p.name for p in tmp.iterdir() if p.is_file())
        mine = {n: {"size": (tmp / n).stat().st_size, "sha256": file_sha256(tmp / n)} for n in self._share(names)}
        files = {k: v for part in _all_gather(mine) for k, v in part.items()}
        if self.env.is_main:
            manifest = {"format": MANIFEST_FORMAT, "step": step, "files": dict(sorted(files.items()))}
            _write_durable(tmp / MANIFEST, json.dumps(manifest, indent=1))
            _fsync_dir(tmp)
            if final.exists():  # re-saving a step after a resume: the old one was broken or is being replaced
                if final.name in self.broken or checkpoint_problem(final) is not None:
                    self._set_aside(final, self.broken.get(final.name) or checkpoint_problem(final) or "")
                else:
                    shutil.rmtree(final)
            os.replace(tmp, final)
            _fsync_dir(self.root)
            self._prune()
        dist.barrier()
        return final

    def _share(self, names: list[str]) -> list[str]:
        """This rank's share of ``names`` for hashing / verifying (round robin)."""
        return names[self.env.rank :: self.env.world_size]

    def _set_aside(self, path: Path, problem: str) -> None:
        """Rename an unusable checkpoint to ``step_N.broken`` (never deleted by the engine)."""
        target = path.with_name(path.name + ".broken")
        k = 1
        while target.exists():
            target = path.with_name(f"{path.name}.broken.{k}")
            k += 1
        os.replace(path, target)
        self.broken.pop(path.name, None)
        warnings.warn(f"unusable checkpoint {path.name} ({problem}) kept as {target.name}", stacklevel=3)

    def _prune(self) -> None:
        """Keep the newest ``keep_last`` complete checkpoints, remove older ones; set broken ones aside."""
        kept = 0
        for _, path in self.step_dirs():
            problem = self.broken.get(path.name) or checkpoint_problem(path)
            if problem is not None:
                self._set_aside(path, problem)
            elif kept < self.keep_last:
                kept += 1
            else:
                shutil.rmtree(path)

    def verify(self, path: Path) -> str | None:
        """Collective: every file of ``path`` against its manifest (size and SHA-256), the ranks hashing their
        share in parallel. Returns the first problem found (naming the file), or None."""
        files, problem = _read_manifest(path) if self.env.is_main else (None, None)
        files, problem = broadcast_object((files, problem))
        if problem is not None:
            return problem
        mine = None
        for name in self._share(sorted(files)):
            if (mine := _checksum_problem(path, name, files[name])) is not None:
                break
        problems = [p for p in _all_gather(mine) if p is not None]
        if problems:
            return problems[0]
        if self.env.is_main and any("sha256" not in e for e in files.values()):
            warnings.warn(f"{path.name}: an older manifest without checksums, checked by file size only", stacklevel=3)
        return None

    def candidates(self) -> list[Path]:
        """Every ``step_N`` directory, newest first, as rank 0 sees them (all ranks agree)."""
        found = [str(p) for _, p in self.step_dirs()] if self.env.is_main else None
        return [Path(p) for p in broadcast_object(found)]

    def latest_valid(self) -> Path | None:
        """The newest checkpoint that passes :meth:`verify` (warning about each newer broken one); collective."""
        chosen, broken = None, []
        for path in self.candidates():
            problem = self.verify(path)
            if problem is None:
                chosen = path
                break
            self.broken[path.name] = problem
            broken.append(f"{path.name} ({problem})")
        if broken and self.env.is_main:
            fallback = chosen.name if chosen else "none"
            warnings.warn(f"skipping unusable checkpoint(s) {'; '.join(broken)}; using {fallback}", stacklevel=2)
        return chosen

    def load_latest(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[Path, dict[str, Any]] | None:
        """Restore model, optimiser and RNG from the newest checkpoint that verifies *and* loads; collective.

        Returns (its path, its trainer state); None when there is no checkpoint at all. A checkpoint that fails
        to verify or to load is reported by name and the next older one tried; when every one fails, ResumeError
        lists them (nothing is changed on disk). A checkpoint that does not fit the model raises
        CheckpointMismatch at once (an older one would not fit either).
        """
        paths = self.candidates()
        failures = []
        for path in paths:
            problem = self.verify(path)
            if problem is None:
                local = None
                try:
                    state = self.load(path, model, optimizer)
                except CheckpointMismatch:
                    raise
                except (Exception, CheckpointException) as exc:  # CheckpointException is a BaseException
                    local = f"load failed: {_describe(exc)}"
                problem = next((p for p in _all_gather(local) if p is not None), None)  # every rank agrees
                if problem is None:
                    if failures and self.env.is_main:
                        warnings.warn(
                            f"skipping unusable checkpoint(s) {'; '.join(failures)}; using {path.name}", stacklevel=2
                        )
                    return path, state
            self.broken[path.name] = problem
            failures.append(f"{path.name} ({problem})")
        if not paths:
            return None
        raise ResumeError(
            f"--resume: no usable checkpoint under {self.root}; nothing was changed (fix or move them, or start a "
            f"fresh run without --resume):\n" + "\n".join(f"  {f}" for f in failures)
        )

    def load(self, path: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None) -> dict[str, Any]:
        """Restore from the checkpoint directory ``path`` (resharding if the world size changed)."""
        try:
            trainer_state = json.loads((path / TRAINER_STATE).read_text())
        except (OSError, ValueError) as exc:
            raise ValueError(f"{TRAINER_STATE}: {exc}") from exc
        not_saved = trainer_state.get("frozen_not_saved", [])
        frozen_now = sorted(n for n, p in model.named_parameters() if not p.requires_grad)
        if not_saved and not_saved != frozen_now:
            raise CheckpointMismatch(
                f"{path} was saved without its {len(not_saved)} frozen parameters (e.g. {not_saved[0]}), but this "
                f"model freezes {len(frozen_now)} others: resume with the same base model and LoRA / freeze setup"
            )
        options = StateDictOptions(ignore_frozen_params=bool(not_saved), strict=not not_saved)
        load_kw = dict(storage_reader=SafeFileSystemReader(str(path)), planner=SafeLoadPlanner())
        if optimizer is None:
            state = {"model": get_model_state_dict(model, options=options)}
            _check_model_keys(path, state["model"])
            dcp.load(state, **load_kw)
            set_model_state_dict(model, state["model"], options=options)
        else:
            model_sd, optim_sd = get_state_dict(model, optimizer, options=options)
            _check_model_keys(path, model_sd)
            state = {"model": model_sd, "optim": optim_sd}
            dcp.load(state, **load_kw)
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


def _describe(exc: BaseException) -> str:
    """A one-line account of a load error; DCP's CheckpointException carries each rank's own error."""
    failures = getattr(exc, "failures", None) or getattr(exc, "_failures", None)
    if isinstance(failures, dict) and failures:
        rank, wrapped = next(iter(failures.items()))
        inner = wrapped[0] if isinstance(wrapped, tuple) else wrapped
        return f"rank {rank}: {type(inner).__name__}: {inner}"
    return f"{type(exc).__name__}: {exc}"


def _check_model_keys(path: Path, model_sd: dict[str, Any]) -> None:
    """Refuse, naming the tensors, a checkpoint whose model tensors differ from the model's (before any load)."""
    try:
        with (path / ".metadata").open("rb") as stream:
            metadata = load_dcp_metadata(stream)
    except UnsafeCheckpointError as exc:
        raise UnsafeCheckpointError(f".metadata: {exc}") from exc
    except (OSError, EOFError, pickle.UnpicklingError, ValueError, TypeError, AttributeError) as exc:
        raise ValueError(f".metadata: unreadable: {type(exc).__name__}: {exc}") from exc
    saved = {k.removeprefix("model.") for k in metadata.state_dict_metadata}
    saved = {k for k in saved if not k.startswith("optim.")}
    missing = sorted(set(model_sd) - saved)
    extra = sorted(saved - set(model_sd))
    if missing or extra:
        raise CheckpointMismatch(
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
