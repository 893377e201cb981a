"""The backend template: ``BaseEngine`` and the options every backend receives.

Checks live once, here: input validation, chunking of large N, preprocessing
and L2 normalisation are written in ``BaseEngine`` and every backend inherits
them; a backend only implements ``_start`` (load the runtime) and ``_run`` (run
one already-normalised NCHW batch and return raw features). This is what makes
backends interchangeable and keeps their outputs comparable.

Two models, named apart: ``model`` is the one configured (its fp32 weights
define the embedding contract); ``graph`` is the ONNX file that actually runs,
which a backend may replace in ``_start`` with a converted fp16 / int8 graph of
the same weights. ``EngineInfo.model_sha256`` is the graph's.
"""

from __future__ import annotations

import importlib.util
import logging
import threading
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from ..config.schema import EmbeddingConfig, QuantizationConfig, ValidationConfig, batch_order_error
from ..errors import EngineError, missing_extra
from .contract import EngineInfo, embedding_contract_id, preprocessing_tag
from .preprocess import NHWC_UINT8, Normalization, l2_normalize, to_blob, validate_faces

if TYPE_CHECKING:
    from ..models.resolve import ResolvedModel

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineOptions:
    """Backend-independent knobs, as ``get_engine`` receives them (defaults: the config's).

    ``cache_dir`` is ``storage.cache_dir`` (``None``: ``$ARCFACE_CACHE_DIR`` or
    ``~/.cache/arcface``): models, converted graphs and plans are kept there.
    ``max_drift_cosine`` is the drift gate's bound, which a backend that converts a
    graph before building on it (TensorRT) checks the conversion against.
    ``preprocess``: ``graph`` (and ``auto``) runs the preprocessing as ONNX nodes on backends
    that can (the graph takes the raw uint8 crops), ``host`` keeps it in numpy (``to_blob``).
    ``quantization`` is how a backend that runs int8 has its graph made (``models.int8_recipe``).
    """

    device: str = "cpu"
    batch_size: int = EmbeddingConfig.batch_size
    opt_batch_size: int = EmbeddingConfig.opt_batch_size
    max_batch_size: int = EmbeddingConfig.max_batch_size
    precision: str = "fp32"
    workspace_size_mb: int = EmbeddingConfig.workspace_size_mb
    cache_dir: str | None = None
    max_drift_cosine: float = ValidationConfig.max_drift_cosine
    preprocess: str = EmbeddingConfig.preprocess  # auto | graph | host (see BaseEngine.runs_uint8_graph)
    quantization: QuantizationConfig = field(default_factory=QuantizationConfig)

    def __post_init__(self) -> None:
        for sizes in ({"batch_size": self.batch_size, "max_batch_size": self.max_batch_size},
                      {"opt_batch_size": self.opt_batch_size, "max_batch_size": self.max_batch_size}):
            if problem := batch_order_error(sizes):
                raise ValueError(f"engine options: {problem}")


class BaseEngine(ABC):
    """Template for backends: public methods check and chunk, ``_run`` computes.

    ``encode`` is thread-safe: runtimes whose sessions are not re-entrant for
    concurrent calls set ``_serialize_runs = True`` and calls are serialised
    with a lock. A backend with its own config section names it in
    ``config_section`` (a field of ``Config``) and its type in ``settings_type``;
    the factory hands it that section, typed, as ``settings``.
    """

    name: str = "base"
    # the Python package whose runtime this backend drives (availability checks it cheaply)
    required_package: ClassVar[str | None] = None
    config_section: ClassVar[str | None] = None
    settings_type: ClassVar[type | None] = None
    _serialize_runs: bool = False
    # True where the runtime runs the uint8-input graph (models.preprocess_graph): the backend
    # then hands it the crops as they are instead of a float32 NCHW blob
    runs_uint8_graph: ClassVar[bool] = False
    # True where precision "auto" may choose below fp32 on this host; the factory
    # then adds an fp32 retry of the backend behind it in the chain.
    auto_may_reduce_precision: bool = False

    @classmethod
    def retry_precisions(cls, settings: Any) -> tuple[str, ...]:
        """With ``auto_may_reduce_precision``: the precisions the chain retries this backend in, in
        order, when the drift gate refuses the one ``auto`` picked (``settings``: its config section)."""
        return ("fp32",)

    def __init__(self, model: ResolvedModel, options: EngineOptions | None = None,
                 settings: Any = None) -> None:
        self.model = model
        self.graph = model
        self.options = options or EngineOptions()
        if settings is None and self.settings_type is not None:
            settings = self.settings_type()
        self.settings = settings
        self._ready = False
        self._start_lock = threading.Lock()
        self._run_lock = threading.Lock()
        self._embedding_dim: int | None = None
        self._warned_rounding = False
        # Set by the fallback chain: which backends were tried and why they were skipped.
        self.fallback_report: dict[str, Any] | None = None

    # -- what subclasses implement -------------------------------------------------
    @classmethod
    def availability(cls) -> str | None:
        """``None`` if this backend can start on this host, else the reason it cannot.

        Must be cheap (``importlib.util.find_spec``, no heavy imports): the
        registry calls it to list backends. The default checks ``required_package``.
        """
        if cls.required_package and importlib.util.find_spec(cls.required_package) is None:
            return f"the {cls.required_package!r} package is not installed"
        return None

    def _require_package(self, purpose: str, also: str = "") -> None:
        """Raise the "reinstall the project" error when ``required_package`` is missing."""
        if self.required_package and self.availability():
            raise missing_extra(self.required_package, None, purpose, also=also)

    @abstractmethod
    def _start(self) -> None:
        """Load the runtime, model and buffers; set ``self._embedding_dim`` (and ``self.graph``
        when another graph than the configured model's runs)."""

    @abstractmethod
    def _run(self, blob: np.ndarray) -> np.ndarray:
        """Raw features ``(n, D)`` for one batch of the graph's input: a normalised
        ``(n, 3, 112, 112)`` float32 blob, or (uint8-input graph) the ``(n, 112, 112, 3)``
        uint8 BGR crops themselves."""

    def _with_graph_preprocessing(self, graph: ResolvedModel) -> ResolvedModel:
        """``graph`` with the preprocessing as ONNX nodes, where this backend runs that and
        ``options.preprocess`` is not ``host``; call it in ``_start`` before loading the graph."""
        if self.options.preprocess == "host" or not self.runs_uint8_graph:
            return graph
        from ..models.preprocess_graph import with_uint8_input

        return with_uint8_input(graph, self.cache_dir)

    def _graph_input(self, faces: np.ndarray) -> np.ndarray:
        """What ``_run`` gets for validated ``faces``: a float32 NCHW blob, or the uint8 crops
        when the graph does its own preprocessing (float crops are rounded to uint8 there; a
        fractional pixel value cannot be represented and is logged once)."""
        if self.graph.input_layout != NHWC_UINT8:
            return to_blob(faces, self.normalization)
        if faces.dtype == np.uint8:
            return faces
        rounded = np.rint(faces)
        if not self._warned_rounding and not np.array_equal(rounded, faces):
            self._warned_rounding = True
            logger.warning("float crops with fractional pixel values are rounded to uint8 for the "
                           "in-graph preprocessing (embedding.preprocess: host keeps them exact)")
        return rounded.astype(np.uint8)

    def _warm_input(self, n: int) -> np.ndarray:
        """``n`` blank faces in the graph's input form, for warm-ups."""
        return self._graph_input(np.zeros((n, 112, 112, 3), np.uint8))

    def _runtime_info(self) -> dict[str, Any]:
        return {}

    def _engine_path(self) -> str:
        return self.graph.path

    @property
    def precision(self) -> str:
        return self.options.precision

    @property
    def cache_dir(self) -> str | None:
        """The configured local cache (models, converted graphs, plans)."""
        return self.options.cache_dir

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
                "backend %s ready: model %s (graph %s), precision %s, device %s",
                self.name,
                self.model.model_id,
                self.graph.sha256[:12],
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
        preprocessing = preprocessing_tag(self.model)
        return EngineInfo(
            backend=self.name,
            model_id=self.model.model_id,
            model_sha256=self.graph.sha256,
            model_path=self.graph.path,
            precision=self.precision,
            device=self.options.device,
            batch_size=self.options.batch_size,
            max_batch_size=self.options.max_batch_size,
            embedding_dim=self.embedding_dim,
            engine_path=self._engine_path(),
            preprocessing=preprocessing,
            contract=embedding_contract_id(self.model.contract_sha256, self.embedding_dim, preprocessing),
            synthetic=self.model.synthetic,
            probe=self.model.probe,
            input_layout=self.graph.input_layout,
            model_ref=self.model.ref,
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
        blob = self._graph_input(faces)
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
