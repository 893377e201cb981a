"""Reference backend: insightface's own ``ArcFaceONNX`` on the same ONNX file.

This is the yardstick for drift: it preprocesses with insightface's own code
(``cv2.dnn.blobFromImages``, its MXNet-graph detection) and runs its own
session, so a mistake in our shared preprocessing shows up as drift against
it instead of being copied into the reference.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from ..base.engine import BaseEngine
from ..errors import BackendUnavailable
from ..hardware import device_index
from .registry import register

logger = logging.getLogger(__name__)


@register("insightface")
class InsightFaceEngine(BaseEngine):
    """``insightface.model_zoo.get_model(path)`` + ``get_feat``; fp32 only."""

    required_package = "insightface"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._model = None

    @property
    def precision(self) -> str:
        return self.model.precision

    def _start(self) -> None:
        self._require_package("the insightface reference backend")
        if self.options.precision not in ("auto", "fp32") or self.model.precision != "fp32":
            raise BackendUnavailable(
                "the insightface reference backend runs fp32 graphs only "
                f"(model precision {self.model.precision}, requested {self.options.precision})"
            )
        from insightface.model_zoo import get_model
        from insightface.model_zoo.arcface_onnx import ArcFaceONNX

        cuda = self.options.device != "cpu"
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if cuda else ["CPUExecutionProvider"]
        try:
            model = get_model(self.model.path, providers=providers)
        except Exception as exc:
            raise BackendUnavailable(f"insightface cannot load {self.model.path}: {exc}") from exc
        if not isinstance(model, ArcFaceONNX):
            raise BackendUnavailable(
                f"insightface routed {self.model.path} to {type(model).__name__}, not a "
                "recognition model (expects input (N, 3, 112, 112) and one output)"
            )
        model.prepare(ctx_id=device_index(self.options.device) if cuda else -1)
        if cuda and "CUDAExecutionProvider" not in model.session.get_providers():
            raise BackendUnavailable(
                f"insightface on {self.options.device}: CUDAExecutionProvider unavailable; "
                f"session runs on {model.session.get_providers()}"
            )
        self._model = model
        warm = model.get_feat([np.zeros((112, 112, 3), np.uint8)])
        self._embedding_dim = int(warm.shape[-1])

    def _forward(self, faces: np.ndarray) -> np.ndarray:
        # insightface's own preprocessing, deliberately not ours (see module docstring).
        return np.asarray(self._model.get_feat(list(faces)), dtype=np.float32)

    def _run(self, blob: np.ndarray) -> np.ndarray:
        session = self._model.session
        return session.run(self._model.output_names, {self._model.input_name: blob})[0]

    def _runtime_info(self) -> dict[str, Any]:
        import insightface

        session = self._model.session if self._model else None
        return {
            "insightface": insightface.__version__,
            "input_mean": getattr(self._model, "input_mean", None),
            "input_std": getattr(self._model, "input_std", None),
            "active_providers": session.get_providers() if session else [],
        }

    def close(self) -> None:
        self._model = None
        super().close()
