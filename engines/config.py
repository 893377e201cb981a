"""YAML configuration -> frozen, typed dataclasses, with ``ARCFACE_*`` environment overrides.

Loaded once at start-up. Unknown keys and ill-typed values are errors that
name the file, the key path and what was expected; a silently ignored typo in
a production config is how an fp16 engine ends up serving an fp32 contract.

Environment overrides (applied after the file, documented in the README):

- ``ARCFACE_<SECTION>__<KEY>`` for any key, e.g. ``ARCFACE_STORAGE__ENDPOINT_URL``;
  lists are comma-separated; nested sections chain with ``__``.
- Short aliases for the common ones: ``ARCFACE_BACKEND``, ``ARCFACE_MODEL``,
  ``ARCFACE_PRECISION``, ``ARCFACE_DEVICE``, ``ARCFACE_BATCH_SIZE``,
  ``ARCFACE_MAX_BATCH_SIZE``, ``ARCFACE_FALLBACK``, ``ARCFACE_CACHE_DIR``.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import yaml

from .errors import ConfigError

REPO_CONFIG_DIR = Path(__file__).resolve().parent.parent / "config"
DEFAULT_CONFIG_ENV = "ARCFACE_CONFIG"
# embedding.tensorrt_config default: read from beside the config file when it exists
DEFAULT_TENSORRT_CONFIG = "arcface_tensorrt.yaml"

BACKEND_NAMES = ("auto", "tensorrt", "onnx", "openvino", "insightface")
PRECISIONS = ("auto", "fp32", "fp16", "bf16", "int8")


def _choices(*values: str) -> dict[str, Any]:
    return {"choices": values}


@dataclass(frozen=True)
class StorageConfig:
    """Where models and engines are cached locally and shared through S3."""

    type: str = field(default="local", metadata=_choices("local", "s3"))
    bucket: str | None = None
    prefix: str = "arcface"
    cache_dir: str = "~/.cache/arcface"
    endpoint_url: str | None = None
    region: str | None = None

    @property
    def cache_path(self) -> Path:
        return Path(os.path.expanduser(self.cache_dir))


@dataclass(frozen=True)
class ValidationConfig:
    """Startup drift gate: a backend whose embeddings drift from the reference is refused."""

    enabled: bool = True
    max_drift_cosine: float = field(default=0.001, metadata={"min": 0.0, "max": 2.0})
    eval_set_size: int = field(default=32, metadata={"min": 2})
    run_on_startup: bool = False
    gate_reduced_precision: bool = True
    reference_backend: str = field(default="insightface", metadata=_choices("insightface", "onnx"))


@dataclass(frozen=True)
class OnnxConfig:
    """ONNX Runtime session settings for the ``onnx`` backend."""

    providers: tuple[str, ...] = (
        "TensorrtExecutionProvider",
        "CUDAExecutionProvider",
        "CPUExecutionProvider",
    )
    intra_op_num_threads: int = field(default=0, metadata={"min": 0})
    inter_op_num_threads: int = field(default=0, metadata={"min": 0})
    graph_optimization_level: str = field(
        default="all", metadata=_choices("disable", "basic", "extended", "all")
    )
    io_binding: bool = True
    trt_engine_cache: bool = True


@dataclass(frozen=True)
class OpenVinoConfig:
    """OpenVINO CPU plugin settings for the ``openvino`` backend."""

    performance_hint: str = field(default="throughput", metadata=_choices("throughput", "latency"))
    num_streams: int = field(default=0, metadata={"min": 0})
    num_threads: int = field(default=0, metadata={"min": 0})
    auto_precisions: tuple[str, ...] = field(
        default=("bf16", "fp32"), metadata=_choices("bf16", "fp16", "int8", "fp32")
    )


@dataclass(frozen=True)
class EmbeddingConfig:
    """The ``embedding`` section: which model, which backend chain, which batch limits."""

    backend: str = field(default="auto", metadata=_choices(*BACKEND_NAMES))
    model: str = "synthetic:iresnet50"
    precision: str = field(default="auto", metadata=_choices(*PRECISIONS))
    device: str = "auto"
    batch_size: int = field(default=32, metadata={"min": 1})
    opt_batch_size: int = field(default=32, metadata={"min": 1})
    max_batch_size: int = field(default=128, metadata={"min": 1})
    workspace_size_mb: int = field(default=2048, metadata={"min": 16})
    fallback: tuple[str, ...] = ("onnx", "insightface")
    tensorrt_config: str | None = DEFAULT_TENSORRT_CONFIG


@dataclass(frozen=True)
class TensorRTConfig:
    """``config/arcface_tensorrt.yaml``: engine build and engine-cache settings."""

    precision: str = field(default="fp16", metadata=_choices("fp32", "fp16", "int8"))
    min_batch_size: int = field(default=1, metadata={"min": 1})
    opt_batch_size: int = field(default=32, metadata={"min": 1})
    max_batch_size: int = field(default=128, metadata={"min": 1})
    workspace_size_mb: int = field(default=2048, metadata={"min": 16})
    device_id: int = field(default=0, metadata={"min": 0})
    build_locally: bool = True
    timing_cache: bool = True
    hardware_compatibility: str = field(
        default="none", metadata=_choices("none", "ampere_plus", "same_compute_capability")
    )
    lock_ttl_s: float = field(default=900.0, metadata={"min": 1.0})
    wait_timeout_s: float = field(default=1800.0, metadata={"min": 1.0})
    storage: StorageConfig = field(default_factory=StorageConfig)


@dataclass(frozen=True)
class Config:
    """Everything ``config/embedding.yaml`` holds."""

    embedding: EmbeddingConfig = field(default_factory=EmbeddingConfig)
    onnx: OnnxConfig = field(default_factory=OnnxConfig)
    openvino: OpenVinoConfig = field(default_factory=OpenVinoConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    tensorrt: TensorRTConfig = field(default_factory=TensorRTConfig)
    source: str = field(default="<defaults>", metadata={"internal": True})


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
        return _build(tp, value, where)
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


def _build(cls: type, data: Any, where: str) -> Any:
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


def _validate(cfg: Config) -> None:
    emb = cfg.embedding
    if emb.batch_size > emb.max_batch_size:
        raise ConfigError(
            f"embedding.batch_size ({emb.batch_size}) must be <= embedding.max_batch_size "
            f"({emb.max_batch_size})"
        )
    if not emb.opt_batch_size <= emb.max_batch_size:
        raise ConfigError(
            f"embedding.opt_batch_size ({emb.opt_batch_size}) must be <= "
            f"embedding.max_batch_size ({emb.max_batch_size})"
        )
    for name in emb.fallback:
        if name not in BACKEND_NAMES or name == "auto":
            raise ConfigError(
                f"embedding.fallback: {name!r} is not a backend; choose from "
                f"{[b for b in BACKEND_NAMES if b != 'auto']}"
            )
    trt = cfg.tensorrt
    if not trt.min_batch_size <= trt.opt_batch_size <= trt.max_batch_size:
        raise ConfigError(
            "tensorrt: need min_batch_size <= opt_batch_size <= max_batch_size, got "
            f"{trt.min_batch_size} / {trt.opt_batch_size} / {trt.max_batch_size}"
        )
    if cfg.storage.type == "s3" and not cfg.storage.bucket:
        raise ConfigError("storage.bucket is required when storage.type is 's3'")
    if trt.storage.type == "s3" and not trt.storage.bucket:
        raise ConfigError("tensorrt.storage.bucket is required when tensorrt.storage.type is 's3'")


def _read_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    return data


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
    tree = _read_yaml(path) if path.exists() or path != default_config_path() else {}
    embedding = tree.get("embedding")
    if "tensorrt" not in tree and (embedding is None or isinstance(embedding, dict)):
        trt_name = (embedding or {}).get("tensorrt_config", DEFAULT_TENSORRT_CONFIG)
        if isinstance(trt_name, str) and trt_name:
            trt_path = (path.parent / trt_name) if not Path(trt_name).is_absolute() else Path(trt_name)
            if trt_path.exists():
                trt_tree = _read_yaml(trt_path)
                tree["tensorrt"] = trt_tree.get("tensorrt", trt_tree)
            elif trt_name != DEFAULT_TENSORRT_CONFIG:
                # only the default name may be absent (a config without TensorRT settings);
                # a file the config names must exist, or its settings would silently not apply
                raise ConfigError(
                    f"{path}: embedding.tensorrt_config names {trt_name!r}, but {trt_path} does not "
                    f"exist; fix the path, or remove the key to use {DEFAULT_TENSORRT_CONFIG!r} "
                    "next to the config when present"
                )
    for keys, value in _env_overrides(environ).items():
        _set_path(tree, keys, value)
    for dotted, value in (overrides or {}).items():
        if value is not None:
            _set_path(tree, tuple(dotted.split(".")), value)
    try:
        cfg = _build(Config, tree, "")
        _validate(cfg)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    return dataclasses.replace(cfg, source=str(path))


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """Plain-dict view (for ``/v1/info`` and logs)."""
    return dataclasses.asdict(cfg)


def build_typed(cls: type, data: Any, where: str = "") -> Any:
    """Build dataclass ``cls`` from a mapping with the same checks as the config files
    (unknown keys, types, choices, bounds). For other typed settings, e.g. Serve app args."""
    return _build(cls, data, where)
