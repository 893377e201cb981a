"""Drift gates: whether an engine, or a converted graph, may stand in for the fp32 reference.

Two checks, both measured on the eval faces and cached because the figures
are deterministic for what they are keyed on:

- the **startup gate** (``startup_gate``): a candidate backend's embeddings
  against the reference backend's (``validation.reference_backend``, fp32, CPU);
  the fallback chain refuses a candidate that drifts further than
  ``validation.max_drift_cosine``;
- the **conversion check** (``conversion_drift``): a converted fp16 / int8
  graph against its fp32 source on ONNX Runtime's CPU provider, before a
  TensorRT plan (minutes of build) is made from it.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .base import preprocess
from .base.engine import BaseEngine, EngineOptions
from .config.schema import Config
from .drift import DriftReport, run_embedding_regression_tests
from .errors import BackendUnavailable, EngineError
from .hardware import cpu_flags, cpu_has_int8_dot, cpu_model_name
from .models.resolve import ResolvedModel, cache_root
from .models.sample_faces import eval_faces

logger = logging.getLogger(__name__)

Gate = Callable[[BaseEngine], "DriftReport | None"]


@functools.lru_cache(maxsize=1)
def package_version() -> str:
    """This project's installed version (``arcface-ray``); ``unknown`` when run from a bare checkout."""
    try:
        return importlib.metadata.version("arcface-ray")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def verdict_path(cfg: Config, model: ResolvedModel, engine: BaseEngine) -> Path:
    """Where the verdict for this (model, backend, precision, runtime, CPU, bound) is kept.

    The verdict is deterministic for that tuple, so every replica and actor on a
    node after the first reads it instead of embedding the eval set again. The
    preprocessing version and the package version are part of the key: a change
    to the numbers fed to the models must be measured again, never hidden behind
    a "pass" cached by the code before it."""
    val = cfg.validation
    key = json.dumps(
        [
            model.sha256, engine.name, type(engine).__qualname__, engine.precision,
            engine.graph.sha256, repr(engine.normalization), engine.info.runtime,
            cpu_model_name(), sorted(cpu_flags()),
            val.reference_backend, val.eval_set_size, val.max_drift_cosine,
            preprocess.PREPROCESSING_VERSION, package_version(),
        ],
        sort_keys=True, default=str,
    )
    digest = hashlib.sha256(key.encode()).hexdigest()[:24]
    return cfg.storage.cache_path / "drift-gate" / f"{engine.name}-{engine.precision}-{digest}.json"


def start_reference(backend: str, make_reference: Callable[[], BaseEngine]) -> BaseEngine:
    """The gate's reference engine, started; ``BackendUnavailable`` naming it if it cannot."""
    engine: BaseEngine | None = None
    try:
        engine = make_reference()
        engine.ensure_ready()
    except (EngineError, ImportError, OSError, RuntimeError) as exc:
        if engine is not None:
            engine.close()
        raise BackendUnavailable(
            f"the drift gate's reference backend {backend!r} (validation.reference_backend) "
            f"cannot start: {type(exc).__name__}: {exc}"
        ) from exc
    return engine


def _write_json(path: Path, data: dict[str, Any], indent: int | None = None) -> None:
    """Atomically (temp file + rename): concurrent starts on one node read whole files only."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=indent))
    os.replace(tmp, path)


def startup_gate(cfg: Config, model: ResolvedModel, make_reference: Callable[[], BaseEngine]) -> Gate | None:
    """A gate comparing a candidate engine to the reference backend on the eval set.

    It checks every engine when ``validation.run_on_startup`` is on, and engines
    computing below fp32 whenever ``validation.gate_reduced_precision`` is on:
    a bf16 or int8 path must prove on *this* CPU that it stays within
    ``max_drift_cosine`` before it serves. ``make_reference`` builds (not starts)
    the fp32 reference engine; it is started once, on the first candidate that
    needs it."""
    val = cfg.validation
    if not val.enabled or not (val.run_on_startup or val.gate_reduced_precision):
        return None
    cache: dict[str, Any] = {}

    def gate(engine: BaseEngine) -> DriftReport | None:
        if engine.name == val.reference_backend and engine.graph.sha256 == model.sha256:
            return None  # the reference itself
        if not val.run_on_startup and engine.precision == "fp32":
            return None
        path = verdict_path(cfg, model, engine)
        try:
            return DriftReport(**json.loads(path.read_text()))
        except (OSError, ValueError, TypeError):
            pass
        if "reference" not in cache:
            try:
                cache["reference"] = start_reference(val.reference_backend, make_reference)
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
            _write_json(path, report.to_dict())
        except OSError as exc:  # a read-only cache only costs the next start a re-check
            logger.warning("could not cache the drift verdict at %s: %s", path, exc)
        return report

    return gate


def conversion_drift(
    source: ResolvedModel,
    converted: ResolvedModel,
    n_faces: int = 32,
    max_drift: float = 0.001,
    cache_dir: str | None = None,
) -> dict[str, Any]:
    """Drift of ``converted`` against its fp32 ``source``, measured on this CPU with ONNX Runtime.

    This is the check a converted graph gets *before* any plan is built from it
    (a TensorRT build takes minutes; a graph that drifts is cheaper to catch here).
    Both graphs run on ONNX Runtime's CPU provider on the eval faces; the report is
    cached beside the converted graph, keyed by both sha256s, the face count, the
    ONNX Runtime version and the CPU, because the figures are deterministic for them.
    On a CPU without int8 dot products ONNX Runtime's int8 kernels saturate, so an
    int8 graph reads worse here than it runs on a GPU; ``int8_dot_product`` says which.
    """
    import onnxruntime as ort

    from .backends.onnx import OnnxEngine

    key = json.dumps([source.sha256, converted.sha256, n_faces, ort.__version__, cpu_model_name(),
                      sorted(cpu_flags())])
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    folder = cache_root(cache_dir) / "models" / "converted"
    cached = folder / f"{Path(converted.path).stem}.drift-{digest}.json"
    facts = {
        "measured_with": f"onnxruntime {ort.__version__} CPUExecutionProvider",
        "cpu": cpu_model_name(),
        "int8_dot_product": cpu_has_int8_dot(),
        "source_sha256": source.sha256,
        "graph_sha256": converted.sha256,
        "precision": converted.precision,
    }
    drift: DriftReport | None = None
    if cached.is_file():
        try:  # the measurement is cached; the verdict is made against today's bound
            drift = DriftReport(**json.loads(cached.read_text())).gate(max_drift)
        except (OSError, ValueError, TypeError):
            drift = None
    if drift is None:
        # the shared engine path (preprocessing, chunking, L2), fp32 graph as the reference
        engines = [OnnxEngine(m, EngineOptions(device="cpu", precision="auto")) for m in (source, converted)]
        try:
            drift = run_embedding_regression_tests(eval_faces(n_faces), *engines, max_drift)
        finally:
            for engine in engines:
                engine.close()
        _write_json(cached, drift.to_dict(), indent=1)
        logger.info(
            "%s %s graph vs fp32 on this CPU (%d faces): min cosine %.6f, mean %.6f, %s",
            source.model_id, converted.precision, n_faces, drift.min_cosine_sim,
            drift.mean_cosine_sim, "within" if drift.passed else "OUTSIDE",
        )
    return {**drift.to_dict(), **facts}
