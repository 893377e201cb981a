"""The one place that turns a backend name (or a config) into a running engine.

Shells and the CLI call ``get_engine`` / ``load_engine`` and nothing else, so
the choice of runtime, the fallback chain and the drift gate behave the same
online, offline and on the command line.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import asdict, replace
from typing import Any

from .base import BaseEngine, EngineOptions
from .config import BACKEND_NAMES, Config, load_config
from .drift import DriftReport, run_embedding_regression_tests
from .errors import BackendUnavailable
from .fallback import start_chain
from .hardware import resolve_device
from .models import ResolvedModel, resolve_model
from .registry import backend_names, get_backend_class

logger = logging.getLogger(__name__)


def auto_chain(device: str) -> list[str]:
    """The order ``auto`` tries backends in on this host, fastest first."""
    if device != "cpu":
        return ["tensorrt", "onnx", "insightface"]
    return ["openvino", "onnx", "insightface"]


def backend_chain(backend: str, fallback: Sequence[str], device: str) -> list[str]:
    """``backend`` then its fallbacks, ``auto`` expanded, duplicates dropped."""
    names = auto_chain(device) if backend == "auto" else [backend]
    for name in fallback:
        names.extend(auto_chain(device) if name == "auto" else [name])
    return list(dict.fromkeys(names))


def backend_extra(name: str, cfg: Config) -> dict[str, Any]:
    """Backend-specific settings from the config, as the backend's ``options.extra``."""
    if name == "onnx":
        return asdict(cfg.onnx)
    if name == "tensorrt":
        return {"tensorrt": cfg.tensorrt}
    return {}


def _options(cfg: Config, device: str, extra: dict[str, Any]) -> EngineOptions:
    emb = cfg.embedding
    return EngineOptions(
        device=device,
        batch_size=emb.batch_size,
        max_batch_size=emb.max_batch_size,
        precision=emb.precision,
        extra=extra,
    )


def make_engine(name: str, model: ResolvedModel, cfg: Config, device: str) -> BaseEngine:
    """Construct (not start) backend ``name`` for ``model``."""
    if name not in backend_names():
        raise BackendUnavailable(f"backend {name!r} is not part of this installation")
    cls = get_backend_class(name)
    extra = {**backend_extra(name, cfg), "config": cfg}
    return cls(model, _options(cfg, device, extra))


def _drift_gate(cfg: Config, model: ResolvedModel, device: str):
    """A gate comparing each candidate to the reference backend on the eval set."""
    val = cfg.validation
    if not (val.enabled and val.run_on_startup):
        return None
    cache: dict[str, Any] = {}

    def gate(engine: BaseEngine) -> DriftReport | None:
        if engine.name == val.reference_backend and engine.model.sha256 == model.sha256:
            return None  # the reference itself
        from .sample_faces import eval_faces

        if "reference" not in cache:
            ref_cfg = replace(cfg, embedding=replace(cfg.embedding, precision="fp32"))
            reference = make_engine(val.reference_backend, model, ref_cfg, "cpu")
            faces = eval_faces(val.eval_set_size)
            cache["faces"] = faces
            cache["reference"] = reference
        return run_embedding_regression_tests(
            cache["faces"], cache["reference"], engine, val.max_drift_cosine
        )

    return gate


def load_engine(cfg: Config | None = None, model: ResolvedModel | None = None) -> BaseEngine:
    """Start the configured chain (``embedding.backend`` then ``embedding.fallback``)."""
    cfg = cfg or load_config()
    emb = cfg.embedding
    device = resolve_device(emb.device)
    if model is None:
        model = resolve_model(
            emb.model,
            cache_dir=cfg.storage.cache_dir,
            endpoint_url=cfg.storage.endpoint_url,
            region=cfg.storage.region,
        )
    chain = backend_chain(emb.backend, emb.fallback, device)
    engine, report = start_chain(
        emb.backend,
        chain,
        lambda name: make_engine(name, model, cfg, device),
        _drift_gate(cfg, model, device),
    )
    engine.fallback_report = report.to_dict()
    return engine


def get_engine(
    backend: str = "auto",
    model: str | ResolvedModel | None = None,
    *,
    device: str | None = None,
    batch_size: int | None = None,
    max_batch_size: int | None = None,
    precision: str | None = None,
    fallback: Sequence[str] | None = None,
    config: Config | None = None,
    validate_on_startup: bool | None = None,
) -> BaseEngine:
    """A started engine for ``backend`` (``"auto"``: the best this host can run).

    Arguments left ``None`` come from ``config`` (default: ``config/embedding.yaml``
    plus ``ARCFACE_*`` overrides). A named backend gets no fallback unless
    ``fallback`` is given: asking for ``tensorrt`` on a CPU host is an error,
    not a silent switch.
    """
    cfg = config or load_config()
    emb = cfg.embedding
    for name in [backend, *(fallback or ())]:
        if name not in BACKEND_NAMES:
            raise ValueError(f"unknown backend {name!r}; choose one of {list(BACKEND_NAMES)}")
    overrides: dict[str, Any] = {
        "backend": backend,
        "fallback": tuple(fallback) if fallback is not None else (),
    }
    if isinstance(model, str):
        overrides["model"] = model
    for key, value in (
        ("device", device),
        ("batch_size", batch_size),
        ("max_batch_size", max_batch_size),
        ("precision", precision),
    ):
        if value is not None:
            overrides[key] = value
    emb = replace(emb, **overrides)
    if emb.batch_size > emb.max_batch_size:
        emb = replace(emb, max_batch_size=emb.batch_size)
    val = cfg.validation
    if validate_on_startup is not None:
        val = replace(val, run_on_startup=validate_on_startup)
    cfg = replace(cfg, embedding=emb, validation=val)
    resolved = model if isinstance(model, ResolvedModel) else None
    return load_engine(cfg, resolved)

