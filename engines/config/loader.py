"""Load the configuration once: YAML file -> typed ``Config``, with ``ARCFACE_*`` environment overrides.

Unknown keys and ill-typed values are errors that name the file, the key path
and what was expected; a silently ignored typo in a production config is how
an fp16 engine ends up serving an fp32 contract.

Environment overrides (applied after the file, documented in the README):

- ``ARCFACE_<SECTION>__<KEY>`` for any key, e.g. ``ARCFACE_STORAGE__ENDPOINT_URL``;
  lists are comma-separated; nested sections chain with ``__``.
- Short aliases for the common ones: ``ARCFACE_BACKEND``, ``ARCFACE_MODEL``,
  ``ARCFACE_PRECISION``, ``ARCFACE_DEVICE``, ``ARCFACE_BATCH_SIZE``,
  ``ARCFACE_MAX_BATCH_SIZE``, ``ARCFACE_FALLBACK``, ``ARCFACE_CACHE_DIR``.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import typing
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from .schema import BACKEND_NAMES, DEFAULT_TENSORRT_CONFIG, Config, batch_order_error
from .typed import build_typed, read_yaml_mapping

logger = logging.getLogger(__name__)

# the repository's config/ directory (engines/config/loader.py -> <repo>/config)
REPO_CONFIG_DIR = Path(__file__).resolve().parents[2] / "config"
DEFAULT_CONFIG_ENV = "ARCFACE_CONFIG"

_ALIASES = {
    "ARCFACE_BACKEND": ("embedding", "backend"),
    "ARCFACE_MODEL": ("embedding", "model"),
    "ARCFACE_PRECISION": ("embedding", "precision"),
    "ARCFACE_DEVICE": ("embedding", "device"),
    "ARCFACE_BATCH_SIZE": ("embedding", "batch_size"),
    "ARCFACE_MAX_BATCH_SIZE": ("embedding", "max_batch_size"),
    "ARCFACE_FALLBACK": ("embedding", "fallback"),
    "ARCFACE_CACHE_DIR": ("storage", "cache_dir"),
}


def _set_path(tree: dict, path: tuple[str, ...], value: str) -> None:
    node = tree
    for key in path[:-1]:
        child = node.get(key)
        if not isinstance(child, dict):
            child = {}
            node[key] = child
        node = child
    node[path[-1]] = value


def _env_overrides(environ: typing.Mapping[str, str]) -> dict[tuple[str, ...], str]:
    overrides: dict[tuple[str, ...], str] = {}
    for name, value in environ.items():
        if name in _ALIASES:
            overrides[_ALIASES[name]] = value
        elif name.startswith("ARCFACE_") and "__" in name:
            parts = tuple(p.lower() for p in name[len("ARCFACE_") :].split("__"))
            overrides[parts] = value
    return overrides


def _key_paths(cls: type, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Every settable key of ``cls`` as a path (``("identity", "gallery")``), nested sections
    followed."""
    paths: list[tuple[str, ...]] = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.metadata.get("internal"):
            continue
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            paths.extend(_key_paths(tp, (*prefix, f.name)))
        else:
            paths.append((*prefix, f.name))
    return paths


_warned: set[str] = set()


def near_miss_variables(environ: typing.Mapping[str, str]) -> dict[str, list[str]]:
    """``ARCFACE_*`` variables that set nothing but are named after a key (``ARCFACE_GALLERY``
    for ``identity.gallery``), with the variables that would set it: a silent typo otherwise."""
    by_leaf: dict[str, list[tuple[str, ...]]] = {}
    for path in _key_paths(Config):
        by_leaf.setdefault(path[-1], []).append(path)
    misses: dict[str, list[str]] = {}
    for name in environ:
        if not name.startswith("ARCFACE_") or "__" in name or name in _ALIASES:
            continue
        paths = by_leaf.get(name[len("ARCFACE_"):].lower(), [])
        if paths:
            misses[name] = ["ARCFACE_" + "__".join(p.upper() for p in path) for path in paths]
    return misses


def _warn_near_misses(environ: typing.Mapping[str, str]) -> None:
    for name, meant in near_miss_variables(environ).items():
        if name not in _warned:
            _warned.add(name)
            logger.warning("%s sets nothing: no setting has that name; did you mean %s?", name,
                           " or ".join(meant))


def _validate(cfg: Config) -> None:
    emb, trt = cfg.embedding, cfg.tensorrt
    for sizes in (
        {"embedding.batch_size": emb.batch_size, "embedding.max_batch_size": emb.max_batch_size},
        {"embedding.opt_batch_size": emb.opt_batch_size, "embedding.max_batch_size": emb.max_batch_size},
        {"tensorrt.min_batch_size": trt.min_batch_size, "tensorrt.opt_batch_size": trt.opt_batch_size,
         "tensorrt.max_batch_size": trt.max_batch_size},
    ):
        if problem := batch_order_error(sizes):
            raise ConfigError(problem)
    for name in emb.fallback:
        if name not in BACKEND_NAMES or name == "auto":
            raise ConfigError(
                f"embedding.fallback: {name!r} is not a backend; choose from "
                f"{[b for b in BACKEND_NAMES if b != 'auto']}"
            )
    if cfg.storage.type == "s3" and not cfg.storage.bucket:
        raise ConfigError("storage.bucket is required when storage.type is 's3'")
    if trt.storage.type == "s3" and not trt.storage.bucket:
        raise ConfigError("tensorrt.storage.bucket is required when tensorrt.storage.type is 's3'")


def default_config_path() -> Path:
    env = os.environ.get(DEFAULT_CONFIG_ENV)
    return Path(env) if env else REPO_CONFIG_DIR / "embedding.yaml"


def load_config(
    path: str | Path | None = None,
    environ: typing.Mapping[str, str] | None = None,
    overrides: dict[str, Any] | None = None,
) -> Config:
    """Load ``path`` (default: ``$ARCFACE_CONFIG`` or ``config/embedding.yaml``).

    Precedence, lowest first: dataclass defaults, the YAML file, the TensorRT
    file it names, ``ARCFACE_*`` environment variables, then ``overrides``
    (dotted keys such as ``{"embedding.backend": "onnx"}``, used by CLI flags).
    """
    path = Path(path) if path is not None else default_config_path()
    environ = os.environ if environ is None else environ
    tree = read_yaml_mapping(path) if path.exists() or path != default_config_path() else {}
    embedding = tree.get("embedding")
    if "tensorrt" not in tree and (embedding is None or isinstance(embedding, dict)):
        trt_name = (embedding or {}).get("tensorrt_config", DEFAULT_TENSORRT_CONFIG)
        if isinstance(trt_name, str) and trt_name:
            trt_path = (path.parent / trt_name) if not Path(trt_name).is_absolute() else Path(trt_name)
            if trt_path.exists():
                trt_tree = read_yaml_mapping(trt_path)
                tree["tensorrt"] = trt_tree.get("tensorrt", trt_tree)
            elif trt_name != DEFAULT_TENSORRT_CONFIG:
                # only the default name may be absent (a config without TensorRT settings);
                # a file the config names must exist, or its settings would silently not apply
                raise ConfigError(
                    f"{path}: embedding.tensorrt_config names {trt_name!r}, but {trt_path} does not "
                    f"exist; fix the path, or remove the key to use {DEFAULT_TENSORRT_CONFIG!r} "
                    "next to the config when present"
                )
    _warn_near_misses(environ)
    for keys, value in _env_overrides(environ).items():
        _set_path(tree, keys, value)
    for dotted, value in (overrides or {}).items():
        if value is not None:
            _set_path(tree, tuple(dotted.split(".")), value)
    try:
        cfg = build_typed(Config, tree, "")
        _validate(cfg)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    return dataclasses.replace(cfg, source=str(path))
