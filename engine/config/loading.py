"""Loading a run config: the recipe's defaults, then a config file, then the command line; ``--help``.

See ``engine.config`` for the precedence and the accepted syntax; values are checked by ``engine.config.coerce``.
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
import typing
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from engine.config.coerce import ConfigError, coerce, strip_optional

T = TypeVar("T")


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
        if strip_optional(ftype) is not bool:
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
