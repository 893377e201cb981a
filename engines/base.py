"""The backend contract: ``EmbeddingEngine``, ``EngineInfo`` and the shared template.

Checks live once, here: input validation, chunking of large N, preprocessing
and L2 normalisation are written in ``BaseEngine`` and every backend inherits
them; a backend only implements ``_start`` (load the runtime) and ``_run`` (run
one already-normalised NCHW batch and return raw features). This is what makes
backends interchangeable and keeps their outputs comparable.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np

from .errors import EngineError
from .models import ResolvedModel
from .preprocess import (
    PREPROCESSING_VERSION,
    Normalization,
    l2_normalize,
    to_blob,
    validate_faces,
)

logger = logging.getLogger(__name__)

NORMALIZATION_TAG = "l2"


def embedding_contract_id(
    model_sha256: str, embedding_dim: int, preprocessing: str, normalization: str = NORMALIZATION_TAG
) -> str:
    """Identify the vector space an embedding lives in.

    Two embeddings are comparable only if their contract ids are equal: same
    weights (sha256), same dimension, same preprocessing, same normalisation.
    Backend and precision are deliberately *not* part of it: a TensorRT fp16
    engine of the same model answers in the same space, within the drift the
    startup gate allows.
    """
    payload = json.dumps(
        [model_sha256, int(embedding_dim), preprocessing, normalization], separators=(",", ":")
    )
    return "arcemb-v1-" + hashlib.sha256(payload.encode()).hexdigest()[:32]


def model_contract(model: ResolvedModel) -> str:
    """The contract id any engine running ``model`` will report, known without starting one
    (drivers that never load the model themselves use it to check outputs before work)."""
    if model.embedding_dim is None:
        raise ValueError(f"{model.model_id}: output dimension is not static in the graph")
    preprocessing = f"{PREPROCESSING_VERSION}/{model.normalization.tag}"
    return embedding_contract_id(model.contract_sha256, model.embedding_dim, preprocessing)


@dataclass(frozen=True)
class EngineInfo:
    """What runs, on what, with which weights: printed by ``arcface info`` and ``/v1/info``."""

    backend: str
    model_id: str
    model_sha256: str
    model_path: str
    precision: str
    device: str
    batch_size: int
    max_batch_size: int
    embedding_dim: int
    engine_path: str
    preprocessing: str
    contract: str
    synthetic: bool
    runtime: dict[str, Any] = field(default_factory=dict)
    fallback: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        if self.synthetic:
            data["model_note"] = (
                "SYNTHETIC model: real ArcFace architecture with seeded random weights, "
                "for tests and benchmarks only; its embeddings identify nobody"
            )
        return data


@runtime_checkable
class EmbeddingEngine(Protocol):
    """What the Serve and Data shells hold; nothing more is assumed of a backend."""

    @property
    def embedding_dim(self) -> int: ...

    @property
    def info(self) -> EngineInfo: ...

    def ensure_ready(self) -> None: ...

    def encode(self, faces: np.ndarray) -> np.ndarray: ...

    def encode_with_norms(self, faces: np.ndarray) -> tuple[np.ndarray, np.ndarray]: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class EngineOptions:
    """Backend-independent knobs, as ``get_engine`` receives them."""

    device: str = "cpu"
    batch_size: int = 32
    max_batch_size: int = 128
    precision: str = "fp32"
    extra: dict[str, Any] = field(default_factory=dict)


class BaseEngine(ABC):
    """Template for backends: public methods check and chunk, ``_run`` computes.

    ``encode`` is thread-safe: runtimes whose sessions are not re-entrant for
    concurrent calls set ``_serialize_runs = True`` and calls are serialised
    with a lock.
    """

    name: str = "base"
    _serialize_runs: bool = False
    # True where precision "auto" may choose below fp32 on this host; the factory
    # then adds an fp32 retry of the backend behind it in the chain.
    auto_may_reduce_precision: bool = False

    def __init__(self, model: ResolvedModel, options: EngineOptions) -> None:
        if options.batch_size < 1 or options.max_batch_size < options.batch_size:
            raise ValueError(
                f"need 1 <= batch_size <= max_batch_size, got batch_size={options.batch_size} "
                f"max_batch_size={options.max_batch_size}"
            )
        self.model = model
        self.options = options
        self._ready = False
        self._start_lock = threading.Lock()
        self._run_lock = threading.Lock()
        self._embedding_dim: int | None = None
        # Set by the fallback chain: which backends were tried and why they were skipped.
        self.fallback_report: dict[str, Any] | None = None

    # -- what subclasses implement -------------------------------------------------
    @classmethod
    def availability(cls) -> str | None:
        """``None`` if this backend can start on this host, else the reason it cannot.

        Must be cheap (``importlib.util.find_spec``, no heavy imports): the
        registry calls it to list backends.
        """
        return None

    @abstractmethod
    def _start(self) -> None:
        """Load the runtime, model and buffers; set ``self._embedding_dim``."""

    @abstractmethod
    def _run(self, blob: np.ndarray) -> np.ndarray:
        """Raw features ``(n, D)`` for a normalised ``(n, 3, 112, 112)`` float32 batch."""

    def _runtime_info(self) -> dict[str, Any]:
        return {}

    def _engine_path(self) -> str:
        return self.model.path

    @property
    def precision(self) -> str:
        return self.options.precision

    @property
    def cache_dir(self) -> str | None:
        """The configured local cache (models, converted graphs, engines)."""
        cfg = self.options.extra.get("config")
        return cfg.storage.cache_dir if cfg is not None else None

    # -- the contract ---------------------------------------------------------------
    @property
    def normalization(self) -> Normalization:
        return self.model.normalization

    def ensure_ready(self) -> None:
        """Start the runtime once (idempotent, thread-safe) and warm it up."""
        if self._ready:
            return
        with self._start_lock:
            if self._ready:
                return
            self._start()
            if self._embedding_dim is None:
                raise EngineError(f"backend {self.name!r} did not report its embedding dim")
            self._ready = True
            logger.info(
                "backend %s ready: model %s (%s), precision %s, device %s",
                self.name,
                self.model.model_id,
                self.model.sha256[:12],
                self.precision,
                self.options.device,
            )

    @property
    def embedding_dim(self) -> int:
        self.ensure_ready()
        assert self._embedding_dim is not None
        return self._embedding_dim

    @property
    def info(self) -> EngineInfo:
        self.ensure_ready()
        preprocessing = f"{PREPROCESSING_VERSION}/{self.normalization.tag}"
        return EngineInfo(
            backend=self.name,
            model_id=self.model.model_id,
            model_sha256=self.model.sha256,
            model_path=self.model.path,
            precision=self.precision,
            device=self.options.device,
            batch_size=self.options.batch_size,
            max_batch_size=self.options.max_batch_size,
            embedding_dim=self.embedding_dim,
            engine_path=self._engine_path(),
            preprocessing=preprocessing,
            contract=embedding_contract_id(
                self.model.contract_sha256, self.embedding_dim, preprocessing
            ),
            synthetic=self.model.synthetic,
            runtime=self._runtime_info(),
            fallback=self.fallback_report,
        )

    def encode(self, faces: np.ndarray) -> np.ndarray:
        """``(N, 112, 112, 3)`` BGR crops -> ``(N, D)`` float32 unit-norm rows."""
        return self.encode_with_norms(faces)[0]

    def encode_with_norms(self, faces: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Like ``encode`` but also returns each row's norm before normalisation."""
        faces = validate_faces(faces)
        self.ensure_ready()
        n = faces.shape[0]
        dim = self.embedding_dim
        if n == 0:
            return np.zeros((0, dim), np.float32), np.zeros((0,), np.float32)
        step = self.options.max_batch_size
        parts = [self._forward(faces[i : i + step]) for i in range(0, n, step)]
        raw = parts[0] if len(parts) == 1 else np.concatenate(parts)
        if raw.shape != (n, dim):
            raise EngineError(
                f"backend {self.name!r} returned features of shape {raw.shape}, expected {(n, dim)}"
            )
        if not np.isfinite(raw).all():
            raise EngineError(
                f"backend {self.name!r} produced non-finite features "
                f"(precision {self.precision}); the model overflows in this precision"
            )
        return l2_normalize(raw)

    def _forward(self, faces: np.ndarray) -> np.ndarray:
        blob = to_blob(faces, self.normalization)
        if self._serialize_runs:
            with self._run_lock:
                return np.asarray(self._run(blob), dtype=np.float32)
        return np.asarray(self._run(blob), dtype=np.float32)

    def close(self) -> None:
        """Release runtime resources; the engine can be started again."""
        self._ready = False

    def __enter__(self) -> BaseEngine:
        self.ensure_ready()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
