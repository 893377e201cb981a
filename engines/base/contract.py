"""The contract a shell may rely on: ``EmbeddingEngine``, ``EngineInfo`` and contract ids.

Nothing here knows a runtime. The Serve and Data shells hold an
``EmbeddingEngine`` and read its ``EngineInfo``; two vectors are comparable
exactly when their contract ids are equal.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np

from .preprocess import PREPROCESSING_VERSION

if TYPE_CHECKING:
    from ..models.resolve import ResolvedModel

NORMALIZATION_TAG = "l2"
SYNTHETIC_NOTE = ("SYNTHETIC model: real ArcFace architecture with seeded random weights, "
                  "for tests and benchmarks only; its embeddings identify nobody")
PROBE_NOTE = ("PROBE model: 16x16 average pooling + one linear layer to 512, about 75k MACs per face; "
              "it measures the shells (Serve, Data) alone and its embeddings identify nobody")


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


def preprocessing_tag(model: ResolvedModel) -> str:
    """The preprocessing part of a contract: our pipeline's version and the model's scaling."""
    return f"{PREPROCESSING_VERSION}/{model.normalization.tag}"


def model_contract(model: ResolvedModel) -> str:
    """The contract id any engine running ``model`` will report, known without starting one
    (drivers that never load the model themselves use it to check outputs before work)."""
    if model.embedding_dim is None:
        raise ValueError(f"{model.model_id}: output dimension is not static in the graph")
    return embedding_contract_id(model.contract_sha256, model.embedding_dim, preprocessing_tag(model))


@dataclass(frozen=True)
class EngineInfo:
    """What runs, on what, with which weights: printed by ``arcface info`` and ``/v1/info``.

    ``model_sha256`` and ``model_path`` are of the graph that runs (a converted
    fp16 / int8 graph where the backend converted one); ``contract`` is of the
    configured fp32 weights, so it is the same for every precision.
    """

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
    probe: bool = False  # synthetic:probe, the zero-cost graph: a measurement of the shells
    input_layout: str = "nchw_float"  # or "nhwc_uint8_bgr": the graph does the preprocessing
    # the configured model reference (``embedding.model``): with backend and precision, what
    # starts the same engine elsewhere (model_path is the derived graph, which another
    # process would convert again and the drift gate's reference cannot run)
    model_ref: str = ""

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        if self.synthetic:
            data["model_note"] = PROBE_NOTE if self.probe else SYNTHETIC_NOTE
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
