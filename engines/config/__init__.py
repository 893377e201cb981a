"""Configuration: the schema (``schema``), the typed validator every package shares (``typed``)
and the loader with its ``ARCFACE_*`` overrides (``loader``)."""

from .loader import DEFAULT_CONFIG_ENV, REPO_CONFIG_DIR, default_config_path, load_config
from .schema import (
    BACKEND_NAMES,
    DEFAULT_TENSORRT_CONFIG,
    PRECISIONS,
    Config,
    EmbeddingConfig,
    OnnxConfig,
    OpenVinoConfig,
    QuantizationConfig,
    StorageConfig,
    TensorRTConfig,
    ValidationConfig,
    batch_order_error,
)
from .typed import build_typed, read_yaml_mapping

__all__ = [
    "BACKEND_NAMES",
    "DEFAULT_CONFIG_ENV",
    "DEFAULT_TENSORRT_CONFIG",
    "PRECISIONS",
    "REPO_CONFIG_DIR",
    "Config",
    "EmbeddingConfig",
    "OnnxConfig",
    "OpenVinoConfig",
    "QuantizationConfig",
    "StorageConfig",
    "TensorRTConfig",
    "ValidationConfig",
    "batch_order_error",
    "build_typed",
    "default_config_path",
    "load_config",
    "read_yaml_mapping",
]
