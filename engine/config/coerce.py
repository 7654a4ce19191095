"""Values checked and converted against a field's annotation: CLI strings parsed, file values checked.

bool, int, float, str, ``X | None``, ``Literal[...]``, ``tuple[...]`` and ``list[...]`` (from a CLI string: a
JSON list or a comma list); a nested dataclass is a section, whose fields are set one by one.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from typing import Any, Literal


class ConfigError(ValueError):
    """A config key or value is invalid; the message names the key (and its source)."""


_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


def strip_optional(tp: Any) -> Any:
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
