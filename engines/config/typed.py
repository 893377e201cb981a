"""The typed validator every package shares: mappings from YAML (or env, or app args) -> dataclasses.

One implementation of "unknown key", "expected an integer", "not one of" and
"must be >= ..." errors, each naming the key path, for the engine config, the
Serve application's arguments and ``user_config``, and the episode job's
settings; and one way to read a YAML file into a mapping with errors that
name the file.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Union

import yaml

from ..errors import ConfigError


def read_yaml_mapping(path: Path, what: str = "config file") -> dict[str, Any]:
    """The mapping at the top of the YAML file ``path`` (``{}`` for an empty file).

    A missing file, invalid YAML or a top level that is not a mapping is a
    ``ConfigError`` naming ``path`` (``what`` says which kind of file it is).
    """
    try:
        data = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"{what} not found: {path}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    return data


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` against the annotation ``tp`` (strings from env are parsed)."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("", "null", "none")):
            return None
        return _coerce(value, args[0], where)
    if dataclasses.is_dataclass(tp):
        return build_typed(tp, value, where)
    if origin is tuple:
        (item_tp, _) = typing.get_args(tp)
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__} {value!r}")
        return tuple(_coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value))
    if tp is bool:
        if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
            return value.lower() in ("1", "true", "yes", "on")
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                raise ConfigError(f"{where}: expected an integer, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                raise ConfigError(f"{where}: expected a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {type(value).__name__} {value!r}")
        return value
    raise ConfigError(f"{where}: unsupported config type {_type_name(tp)}")  # pragma: no cover


def _check_metadata(value: Any, meta: Any, where: str) -> None:
    values = value if isinstance(value, tuple) else (value,)
    for v in values:
        if v is None:
            continue
        if "choices" in meta and v not in meta["choices"]:
            raise ConfigError(f"{where}: {v!r} is not one of {list(meta['choices'])}")
        if "min" in meta and v < meta["min"]:
            raise ConfigError(f"{where}: must be >= {meta['min']}, got {v!r}")
        if "max" in meta and v > meta["max"]:
            raise ConfigError(f"{where}: must be <= {meta['max']}, got {v!r}")


def build_typed(cls: type, data: Any, where: str = "") -> Any:
    """Build dataclass ``cls`` from a mapping: unknown keys, types, choices and bounds checked,
    every error a ``ConfigError`` naming the key path. Every typed settings object of every
    package (engine config, Serve app args and ``user_config``, the episode job) is built here."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__} {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(
            f"{where}: unknown key(s) {unknown}; valid keys are {sorted(fields)}"
        )
    kwargs = {}
    for name, value in data.items():
        key_where = f"{where}.{name}" if where else name
        coerced = _coerce(value, hints[name], key_where)
        _check_metadata(coerced, fields[name].metadata, key_where)
        kwargs[name] = coerced
    return cls(**kwargs)
