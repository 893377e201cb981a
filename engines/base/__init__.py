"""What every backend shares and a shell may rely on: the contract (``contract``), the
``BaseEngine`` template (``engine``), insightface-identical preprocessing (``preprocess``)
and 5-point alignment (``align``)."""

from .align import ARCFACE_TEMPLATE, norm_crop
from .contract import EmbeddingEngine, EngineInfo, embedding_contract_id, model_contract
from .engine import BaseEngine, EngineOptions
from .preprocess import FACE_SIZE, PREPROCESSING_VERSION, Normalization

__all__ = [
    "ARCFACE_TEMPLATE",
    "FACE_SIZE",
    "PREPROCESSING_VERSION",
    "BaseEngine",
    "EmbeddingEngine",
    "EngineInfo",
    "EngineOptions",
    "Normalization",
    "embedding_contract_id",
    "model_contract",
    "norm_crop",
]
