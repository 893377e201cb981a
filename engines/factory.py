"""The one place that turns a backend name (or a config) into a running engine.

Shells and the CLI call ``get_engine`` / ``load_engine`` and nothing else, so
the choice of runtime, the fallback chain and the drift gate behave the same
online, offline and on the command line.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from .backends.registry import backend_names, get_backend_class
from .base.engine import BaseEngine, EngineOptions
from .config.loader import load_config
from .config.schema import BACKEND_NAMES, Config
from .drift_gate import startup_gate
from .errors import BackendUnavailable
from .fallback import start_chain
from .hardware import resolve_device
from .models.resolve import ResolvedModel, resolve_model

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


def engine_options(cfg: Config, device: str) -> EngineOptions:
    """The backend-independent options ``cfg`` gives an engine on ``device``."""
    emb = cfg.embedding
    return EngineOptions(
        device=device,
        batch_size=emb.batch_size,
        opt_batch_size=emb.opt_batch_size,
        max_batch_size=emb.max_batch_size,
        precision=emb.precision,
        workspace_size_mb=emb.workspace_size_mb,
        cache_dir=cfg.storage.cache_dir,
        max_drift_cosine=cfg.validation.max_drift_cosine,
        preprocess=emb.preprocess,
        quantization=cfg.quantization,
    )


def make_engine(name: str, model: ResolvedModel, cfg: Config, device: str) -> BaseEngine:
    """Construct (not start) backend ``name`` for ``model``, with its own config section."""
    if name not in backend_names():
        raise BackendUnavailable(f"backend {name!r} is not part of this installation")
    cls = get_backend_class(name)
    settings = getattr(cfg, cls.config_section) if cls.config_section else None
    return cls(model, engine_options(cfg, device), settings)


def configured_model(cfg: Config, ref: str | None = None) -> ResolvedModel:
    """``ref`` (default ``embedding.model``) resolved with the config's storage settings
    (cache directory, S3 endpoint and region): the one way the CLI, the shells and the
    factory turn a configured model into a local file."""
    storage = cfg.storage
    return resolve_model(ref or cfg.embedding.model, cache_dir=storage.cache_dir,
                         endpoint_url=storage.endpoint_url, region=storage.region)


def _reference_maker(cfg: Config, model: ResolvedModel):
    """Builds the drift gate's reference engine: ``validation.reference_backend``, fp32, CPU."""
    ref_cfg = replace(cfg, embedding=replace(cfg.embedding, precision="fp32"))
    return lambda: make_engine(cfg.validation.reference_backend, model, ref_cfg, "cpu")


def with_precision_retries(chain: Sequence[str], precision: str, cfg: Config | None = None) -> list[str]:
    """With precision ``auto``, a backend that may pick a reduced precision gets further entries
    ``name:<precision>``, one per precision of its auto order below its first (``retry_precisions``;
    ``fp32`` at least): if the drift gate refuses its int8, its bf16 is the next best, then fp32."""
    if precision != "auto":
        return list(chain)
    names: list[str] = []
    for name in chain:
        names.append(name)
        if name in backend_names() and get_backend_class(name).auto_may_reduce_precision:
            cls = get_backend_class(name)
            settings = getattr(cfg, cls.config_section) if cfg is not None and cls.config_section else None
            names += [f"{name}:{p}" for p in cls.retry_precisions(settings)]
    return names


def load_engine(cfg: Config | None = None, model: ResolvedModel | None = None) -> BaseEngine:
    """Start the configured chain (``embedding.backend`` then ``embedding.fallback``)."""
    cfg = cfg or load_config()
    emb = cfg.embedding
    device = resolve_device(emb.device)
    if model is None:
        model = configured_model(cfg)
    chain = with_precision_retries(backend_chain(emb.backend, emb.fallback, device), emb.precision, cfg)

    def make(entry: str) -> BaseEngine:
        name, _, precision = entry.partition(":")
        entry_cfg = cfg if not precision else replace(cfg, embedding=replace(emb, precision=precision))
        return make_engine(name, model, entry_cfg, device)

    gate = startup_gate(cfg, model, _reference_maker(cfg, model))
    engine, report = start_chain(emb.backend, chain, make, gate)
    engine.fallback_report = report.to_dict()
    return engine


def _fit_batch_limits(emb: Any, batch_given: bool, max_given: bool) -> Any:
    """Arguments win over the config: the one of ``batch_size`` / ``max_batch_size`` the caller
    did not give follows the one it gave (an explicit batch above the configured limit raises
    the limit; an explicit limit below the configured batch lowers the batch), and the opt batch
    (a tuning hint) never exceeds the limit. Given both, the caller's pair must itself obey the
    rule, which ``EngineOptions`` checks."""
    if emb.batch_size > emb.max_batch_size and not (batch_given and max_given):
        emb = (replace(emb, batch_size=emb.max_batch_size) if max_given and not batch_given
               else replace(emb, max_batch_size=emb.batch_size))
    return replace(emb, opt_batch_size=min(emb.opt_batch_size, emb.max_batch_size))


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
    emb = _fit_batch_limits(replace(emb, **overrides), batch_size is not None, max_batch_size is not None)
    val = cfg.validation
    if validate_on_startup is not None:
        # False: no gate at all, not even for reduced precision (compare and bench measure
        # drift themselves and must be able to start a path the gate would refuse)
        val = replace(val, run_on_startup=validate_on_startup,
                      gate_reduced_precision=val.gate_reduced_precision and validate_on_startup)
    cfg = replace(cfg, embedding=emb, validation=val)
    resolved = model if isinstance(model, ResolvedModel) else None
    return load_engine(cfg, resolved)

