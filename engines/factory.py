"""The one place that turns a backend name (or a config) into a running engine.

Shells and the CLI call ``get_engine`` / ``load_engine`` and nothing else, so
the choice of runtime, the fallback chain and the drift gate behave the same
online, offline and on the command line.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from .base import BaseEngine, EngineOptions
from .config import BACKEND_NAMES, Config, load_config
from .drift import DriftReport, run_embedding_regression_tests
from .errors import BackendUnavailable, EngineError
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


@functools.lru_cache(maxsize=1)
def _package_version() -> str:
    """This project's installed version (``arcface-ray``); ``unknown`` when run from a bare checkout."""
    try:
        return importlib.metadata.version("arcface-ray")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _gate_cache_path(cfg: Config, model: ResolvedModel, engine: BaseEngine) -> Path:
    """Where the verdict for this (model, backend, precision, runtime, CPU, bound) is kept.

    The verdict is deterministic for that tuple, so every replica and actor on a
    node after the first reads it instead of embedding the eval set again. The
    preprocessing version and the package version are part of the key: a change
    to the numbers fed to the models must be measured again, never hidden behind
    a "pass" cached by the code before it."""
    from .hardware import cpu_flags, cpu_model_name
    from .preprocess import PREPROCESSING_VERSION

    val = cfg.validation
    key = json.dumps(
        [
            model.sha256, engine.name, type(engine).__qualname__, engine.precision,
            engine.model.sha256, repr(engine.normalization), engine.info.runtime,
            cpu_model_name(), sorted(cpu_flags()),
            val.reference_backend, val.eval_set_size, val.max_drift_cosine,
            PREPROCESSING_VERSION, _package_version(),
        ],
        sort_keys=True, default=str,
    )
    digest = hashlib.sha256(key.encode()).hexdigest()[:24]
    return cfg.storage.cache_path / "drift-gate" / f"{engine.name}-{engine.precision}-{digest}.json"


def _start_reference(cfg: Config, model: ResolvedModel) -> BaseEngine:
    """The gate's reference engine (fp32, CPU), started; ``BackendUnavailable`` naming it if it cannot."""
    backend = cfg.validation.reference_backend
    ref_cfg = replace(cfg, embedding=replace(cfg.embedding, precision="fp32"))
    engine: BaseEngine | None = None
    try:
        engine = make_engine(backend, model, ref_cfg, "cpu")
        engine.ensure_ready()
    except (EngineError, ImportError, OSError, RuntimeError) as exc:
        if engine is not None:
            engine.close()
        raise BackendUnavailable(
            f"the drift gate's reference backend {backend!r} (validation.reference_backend) "
            f"cannot start: {type(exc).__name__}: {exc}"
        ) from exc
    return engine


def _drift_gate(cfg: Config, model: ResolvedModel, device: str):
    """A gate comparing a candidate engine to the reference backend on the eval set.

    It checks every engine when ``validation.run_on_startup`` is on, and engines
    computing below fp32 whenever ``validation.gate_reduced_precision`` is on:
    a bf16 or int8 path must prove on *this* CPU that it stays within
    ``max_drift_cosine`` before it serves."""
    val = cfg.validation
    if not val.enabled or not (val.run_on_startup or val.gate_reduced_precision):
        return None
    cache: dict[str, Any] = {}

    def gate(engine: BaseEngine) -> DriftReport | None:
        if engine.name == val.reference_backend and engine.model.sha256 == model.sha256:
            return None  # the reference itself
        if not val.run_on_startup and engine.precision == "fp32":
            return None
        verdict_path = _gate_cache_path(cfg, model, engine)
        try:
            return DriftReport(**json.loads(verdict_path.read_text()))
        except (OSError, ValueError, TypeError):
            pass
        from .sample_faces import eval_faces

        if "reference" not in cache:
            try:
                cache["reference"] = _start_reference(cfg, model)
            except BackendUnavailable as exc:
                cache["reference"] = exc  # tried once: every later candidate gets the same reason
        if isinstance(cache["reference"], BackendUnavailable):
            raise BackendUnavailable(str(cache["reference"])) from cache["reference"].__cause__
        if "faces" not in cache:
            cache["faces"] = eval_faces(val.eval_set_size)
        report = run_embedding_regression_tests(
            cache["faces"], cache["reference"], engine, val.max_drift_cosine
        )
        try:
            verdict_path.parent.mkdir(parents=True, exist_ok=True)
            tmp = verdict_path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(report.to_dict()))
            os.replace(tmp, verdict_path)
        except OSError as exc:  # a read-only cache only costs the next start a re-check
            logger.warning("could not cache the drift verdict at %s: %s", verdict_path, exc)
        return report

    return gate


def with_precision_retries(chain: Sequence[str], precision: str) -> list[str]:
    """With precision ``auto``, a backend that may pick a reduced precision gets a second
    entry ``name:fp32``: if the drift gate refuses its bf16, its fp32 is the next best."""
    if precision != "auto":
        return list(chain)
    names: list[str] = []
    for name in chain:
        names.append(name)
        if name in backend_names() and get_backend_class(name).auto_may_reduce_precision:
            names.append(f"{name}:fp32")
    return names


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
    chain = with_precision_retries(backend_chain(emb.backend, emb.fallback, device), emb.precision)

    def make(entry: str) -> BaseEngine:
        name, _, precision = entry.partition(":")
        entry_cfg = cfg if not precision else replace(cfg, embedding=replace(emb, precision=precision))
        return make_engine(name, model, entry_cfg, device)

    engine, report = start_chain(emb.backend, chain, make, _drift_gate(cfg, model, device))
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
        # False: no gate at all, not even for reduced precision (compare and bench measure
        # drift themselves and must be able to start a path the gate would refuse)
        val = replace(val, run_on_startup=validate_on_startup,
                      gate_reduced_precision=val.gate_reduced_precision and validate_on_startup)
    cfg = replace(cfg, embedding=emb, validation=val)
    resolved = model if isinstance(model, ResolvedModel) else None
    return load_engine(cfg, resolved)

