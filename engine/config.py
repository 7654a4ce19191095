"""Run configuration: plain dataclasses, loaded from a recipe's defaults, a config file and the command line.

A recipe composes its config from section dataclasses, one field per section::

    @dataclass
    class GRPORecipeConfig:                              # recipes/grpo_sif.py
        model: ModelConfig = field(default_factory=ModelConfig)
        data: DataConfig = field(default_factory=DataConfig)
        lora: LoRAConfig = field(default_factory=LoRAConfig)
        rl: RLConfig = field(default_factory=RLConfig)   # engine.rl.grpo's own section
        train: TrainConfig = field(default_factory=TrainConfig)
        summary_window: int = 10                         # plain fields beside the sections work too

and loads it with ``load_config(GRPORecipeConfig(), sys.argv[1:])``. Precedence, lowest first:
the recipe's defaults, then ``--config FILE`` (JSON, or TOML via tomllib: tables are sections), then dotted CLI
overrides ``--train.lr 1e-5 --rl.num_generations 8`` (also ``--train.lr=1e-5``). Values are parsed and checked
against each field's annotation (bool, int, float, str, ``X | None``, ``Literal[...]``, ``tuple[...]``,
``list[...]``, nested dataclasses); an unknown key is an error naming it and the nearest valid key. Sections nest to
any depth, so any dataclass tree works. ``--resume`` is shorthand for ``--train.resume true``. A recipe's ``main``
decorated with :func:`exit_on_config_error` prints a ConfigError as one line on rank 0 and exits with status 2.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import functools
import json
import os
import sys
import tomllib
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

T = TypeVar("T")


class ConfigError(ValueError):
    """A config key or value is invalid; the message names the key (and its source)."""


def exit_on_config_error(main: Callable[..., T]) -> Callable[..., T]:
    """Wrap a recipe's ``main``: a ConfigError (a bad key or value, a refused ``--resume``) ends the process with
    its message on stderr — printed by rank 0 only, prefixed ``error:`` — and exit status 2, not a traceback."""

    @functools.wraps(main)
    def wrapper(*args: Any, **kwargs: Any) -> T:
        try:
            return main(*args, **kwargs)
        except ConfigError as exc:
            if os.environ.get("RANK", "0") == "0":
                print(f"error: {exc}", file=sys.stderr, flush=True)
            raise SystemExit(2) from None

    return wrapper


@dataclass
class ModelConfig:
    """Which checkpoint to load. ``path`` empty: the tiny embedded default (created on first use).

    ``dtype``: storage of the loaded weights. Trainable parameters are always fp32 masters (FSDP2 computes in bf16
    on CUDA, see engine.distributed.parallel); ``bfloat16`` keeps a frozen LoRA base in bf16 (half the memory).
    """

    path: str = ""
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"


@dataclass
class DataConfig:
    """Where the records come from and how sequences are shaped. ``path`` empty: the bundled synthetic set.

    with_depth: SFT prompts show the colour-mapped depth image after the RGB one. None: as the rollouts and the
    evaluation of the same focusing mode show it (crop: yes, text: no), so that SFT trains on the prompts the
    policy is later sampled and judged on.
    """

    path: str = ""
    eval_path: str = ""
    max_seq_len: int = 2048
    max_pixels: int = 448 * 448
    min_pixels: int = 56 * 56
    with_depth: bool | None = None
    shuffle: bool = True
    limit: int = 0  # 0 = all records
    max_skip_share: float = 0.1  # stop once more than this share of the records is skipped (at load or decode)


@dataclass
class LoRAConfig:
    """Low-rank adapters on nn.Linear modules selected by name patterns (see engine.train.lora)."""

    enabled: bool = False
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    freeze_vision: bool = True


@dataclass
class TrainConfig:
    """The optimisation loop: schedule, batch shape, clipping, checkpoints, logging."""

    run_name: str = "run"
    output_dir: str = "runs"
    seed: int = 0
    lr: float = 1e-5
    min_lr_ratio: float = 0.0
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_ratio: float = 0.1
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping (the norm is still logged)
    micro_batch_size: int = 1
    grad_accum_steps: int = 1
    max_steps: int = 0  # 0: epochs x steps per epoch
    epochs: int = 1
    checkpoint_every: int = 0  # steps; 0: only at the end
    keep_last: int = 2
    checkpoint_frozen: bool = False  # also save frozen parameters (a LoRA base); off: they come from model.path
    resume: bool = False
    resume_accept: tuple[str, ...] = ()  # keys / sections whose changes a resume accepts as given (docs/robustness.md)
    export_hf: bool = True
    export_dtype: Literal["float32", "bfloat16"] = "bfloat16"
    export_max_shard_mb: int = 4096  # HF export: model-0000i-of-0000N.safetensors files of at most this size
    dp_replicate: int = 1  # 1: FSDP over all ranks; R > 1: HSDP, R replicas x (world / R) shards; 0: one per node
    activation_checkpointing: bool = False
    reshard_after_forward: bool = True
    max_consecutive_nonfinite: int = 5
    log_every: int = 1
    progress_bar: bool = True
    plot: bool = True
    tensorboard: Literal["auto", "on", "off"] = "auto"  # events in <run>/tb/: auto = when tensorboard is installed


# ---------------------------------------------------------------------------------------------------------------
# loading


def load_config(defaults: T, argv: Sequence[str] = (), *, config_file: str | Path | None = None) -> T:
    """The recipe's ``defaults`` (a dataclass instance, not modified) updated by a config file, then by ``argv``.

    ``argv`` may contain ``--config FILE`` (applied before the other overrides, wherever it appears).
    ``--help`` / ``-h`` prints every key with its type and resolved value, then exits.
    Raises ConfigError naming the offending key.
    """
    if not dataclasses.is_dataclass(defaults) or isinstance(defaults, type):
        raise ConfigError(f"load_config needs a dataclass instance, got {defaults!r}")
    cfg = copy.deepcopy(defaults)
    wants_help = any(a in ("--help", "-h") for a in argv)
    overrides, file_from_argv = parse_cli([a for a in argv if a not in ("--help", "-h")])
    for path in (config_file, file_from_argv):
        if path is not None:
            apply_mapping(cfg, read_config_file(path), source=str(path))
    for key, raw in overrides:
        set_value(cfg, key, raw, from_string=True, source="command line")
    if wants_help:
        print(format_help(cfg))
        raise SystemExit(0)
    return cfg


def format_help(cfg: Any) -> str:
    """One line per dotted key: ``--key TYPE = value``; sections in declaration order."""
    lines = ["options (--section.key VALUE; --config FILE.toml|.json; --resume):"]
    for key in flat_keys(cfg):
        target, name, ftype = _resolve(cfg, key, "help")
        type_name = getattr(ftype, "__name__", None) if not typing.get_args(ftype) else None
        lines.append(f"  --{key} {type_name or str(ftype).replace('typing.', '')} = {getattr(target, name)!r}")
    return "\n".join(lines)


def parse_cli(argv: Sequence[str]) -> tuple[list[tuple[str, str | None]], str | None]:
    """Split argv into ``[(dotted key, raw string or None for a bare flag)]`` and the ``--config`` file, if any."""
    overrides: list[tuple[str, str | None]] = []
    config_file = None
    args = list(argv)
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or len(arg) == 2:
            raise ConfigError(f"unexpected command-line argument {arg!r}: expected --section.key VALUE")
        key, eq, value = arg[2:].partition("=")
        raw: str | None = value if eq else None
        if raw is None and i + 1 < len(args) and not _looks_like_flag(args[i + 1]):
            raw = args[i + 1]
            i += 1
        i += 1
        if key == "config":
            if raw is None:
                raise ConfigError("--config needs a file path")
            config_file = raw
        elif key == "resume":
            overrides.append(("train.resume", raw if raw is not None else "true"))
        else:
            overrides.append((key.replace("-", "_"), raw))
    return overrides, config_file


def _looks_like_flag(arg: str) -> bool:
    return arg.startswith("--") and len(arg) > 2 and not arg[2].isdigit() and arg[2] != "."


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Parse a ``.json`` or ``.toml`` config file into a nested dict."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    text = path.read_text()
    try:
        if path.suffix == ".toml":
            data = tomllib.loads(text)
        elif path.suffix == ".json":
            data = json.loads(text)
        else:
            raise ConfigError(f"config file {path}: unsupported extension {path.suffix!r} (use .json or .toml)")
    except (ValueError, json.JSONDecodeError) as exc:
        raise ConfigError(f"config file {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: top level must be a table/object, got {type(data).__name__}")
    return data


def apply_mapping(cfg: Any, data: Mapping[str, Any], *, source: str = "mapping", prefix: str = "") -> None:
    """Apply a nested mapping (sections as sub-mappings) or dotted keys to ``cfg`` in place."""
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        target, name, ftype = _resolve(cfg, dotted, source)
        if dataclasses.is_dataclass(ftype) and isinstance(value, Mapping):
            apply_mapping(cfg, value, source=source, prefix=f"{dotted}.")
            continue
        setattr(target, name, _coerce_from(source, value, ftype, dotted, from_string=False))


def set_value(cfg: Any, dotted: str, raw: Any, *, from_string: bool, source: str = "override") -> None:
    """Set one dotted key; ``raw`` is a CLI string (``from_string``) or an already-typed value."""
    target, name, ftype = _resolve(cfg, dotted, source)
    if raw is None:
        if _strip_optional(ftype) is not bool:
            raise ConfigError(f"{source}: --{dotted} needs a value")
        raw = "true"
    setattr(target, name, _coerce_from(source, raw, ftype, dotted, from_string=from_string))


def _coerce_from(source: str, value: Any, tp: Any, key: str, *, from_string: bool) -> Any:
    try:
        return coerce(value, tp, key=key, from_string=from_string)
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None


def to_dict(cfg: Any) -> dict[str, Any]:
    """A JSON-serialisable nested dict of ``cfg`` (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def flat_keys(cfg: Any, prefix: str = "") -> list[str]:
    """All dotted leaf keys of a dataclass tree."""
    keys = []
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            keys.extend(flat_keys(value, f"{prefix}{f.name}."))
        else:
            keys.append(f"{prefix}{f.name}")
    return keys


def _resolve(cfg: Any, dotted: str, source: str) -> tuple[Any, str, Any]:
    """The dataclass instance holding ``dotted``'s last part, that part, and its annotation."""
    parts = dotted.split(".")
    node = cfg
    for depth, part in enumerate(parts):
        if not dataclasses.is_dataclass(node):
            raise ConfigError(f"{source}: unknown key {dotted!r}: {'.'.join(parts[:depth])} is not a section")
        hints = typing.get_type_hints(type(node))
        names = [f.name for f in dataclasses.fields(node)]
        if part not in names:
            valid = flat_keys(cfg)
            near = difflib.get_close_matches(dotted, valid, n=1, cutoff=0.0)
            hint = f"; did you mean {near[0]!r}?" if near else ""
            raise ConfigError(f"{source}: unknown config key {dotted!r}{hint}")
        if depth == len(parts) - 1:
            return node, part, hints[part]
        node = getattr(node, part)
    raise ConfigError(f"{source}: empty config key")


# ---------------------------------------------------------------------------------------------------------------
# typing

_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


def _strip_optional(tp: Any) -> Any:
    args = typing.get_args(tp)
    if _is_union(tp) and type(None) in args and len(args) == 2:
        return next(a for a in args if a is not type(None))
    return tp


def _is_union(tp: Any) -> bool:
    return typing.get_origin(tp) in (typing.Union, types.UnionType)


def coerce(value: Any, tp: Any, *, key: str, from_string: bool) -> Any:
    """Check/convert ``value`` to annotation ``tp``; CLI strings are parsed (sequences as JSON or comma lists)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if _is_union(tp):
        if type(None) in args and (value is None or (from_string and str(value).lower() in ("none", "null"))):
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return coerce(value, arg, key=key, from_string=from_string)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(f"{key}: {value!r} matches none of {tp}: " + "; ".join(errors))
    if origin is Literal:
        for choice in args:
            if value == choice or (from_string and str(value) == str(choice)):
                return choice
        raise ConfigError(f"{key}: {value!r} is not one of {list(args)}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        if from_string and str(value).lower() in _TRUE | _FALSE:
            return str(value).lower() in _TRUE
        raise ConfigError(f"{key}: expected a bool (true/false), got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected an int, got bool {value!r}")
        if isinstance(value, int):
            return value
        if from_string:
            try:
                return int(str(value).replace("_", ""))
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected an int, got {value!r}")
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected a float, got bool {value!r}")
        if isinstance(value, (int, float)):
            return float(value)
        if from_string:
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a float, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    if origin in (tuple, list):
        items = _split_sequence(value, key) if from_string and isinstance(value, str) else value
        if not isinstance(items, (list, tuple)):
            raise ConfigError(f"{key}: expected a sequence, got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(items) != len(args):
                raise ConfigError(f"{key}: expected {len(args)} items, got {len(items)}: {value!r}")
            item_types = list(args)
        else:
            item_types = [args[0] if args else Any] * len(items)
        parsed = [
            coerce(v, t, key=f"{key}[{i}]", from_string=from_string and isinstance(v, str))
            for i, (v, t) in enumerate(zip(items, item_types))
        ]
        return tuple(parsed) if origin is tuple else parsed
    if dataclasses.is_dataclass(tp):
        raise ConfigError(f"{key} is a section; set its fields, e.g. {key}.{dataclasses.fields(tp)[0].name}")
    raise ConfigError(f"{key}: unsupported annotation {tp}")


def _split_sequence(text: str, key: str) -> list[Any]:
    text = text.strip()
    if text.startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{key}: cannot parse {text!r} as a JSON list: {exc}") from exc
        return [v if isinstance(v, str) else json.dumps(v) for v in items]
    return [] if not text else [part.strip() for part in text.split(",")]


__all__ = [
    "ConfigError",
    "DataConfig",
    "LoRAConfig",
    "ModelConfig",
    "TrainConfig",
    "apply_mapping",
    "coerce",
    "exit_on_config_error",
    "flat_keys",
    "format_help",
    "load_config",
    "parse_cli",
    "read_config_file",
    "set_value",
    "to_dict",
]
