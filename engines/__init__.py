"""Shared ArcFace embedding engine: backends, models, drift and benchmarks. No Ray in here.

The public facade: shells (``serve_app``, ``data_jobs``) and the CLI use only
what this module exports.
"""

from .base import EmbeddingEngine, EngineInfo, embedding_contract_id
from .config import Config, load_config
from .drift import DriftReport, compare_embeddings, run_embedding_regression_tests
from .errors import (
    BackendUnavailable,
    ConfigError,
    DriftGateError,
    EngineBuildError,
    EngineError,
    ModelResolutionError,
)
from .factory import get_engine, load_engine
from .models import ResolvedModel, resolve_model
from .registry import available_backends, backend_names, register

__all__ = [
    "BackendUnavailable",
    "Config",
    "ConfigError",
    "DriftGateError",
    "DriftReport",
    "EmbeddingEngine",
    "EngineBuildError",
    "EngineError",
    "EngineInfo",
    "ModelResolutionError",
    "ResolvedModel",
    "available_backends",
    "backend_names",
    "compare_embeddings",
    "embedding_contract_id",
    "get_engine",
    "load_config",
    "load_engine",
    "register",
    "resolve_model",
    "run_embedding_regression_tests",
]
