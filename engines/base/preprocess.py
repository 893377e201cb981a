"""Face crop validation, insightface-identical normalisation, and L2 normalisation.

Every backend feeds its runtime from ``to_blob`` so that a channel-order or
scaling mistake can only exist once (and the drift gate catches it). The
arithmetic mirrors ``cv2.dnn.blobFromImages(imgs, 1/std, (112, 112), (mean,)*3,
swapRB=True)`` operation by operation in float32, which makes the two
bit-for-bit equal (asserted in tests) while avoiding OpenCV's per-image copies.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Bump when anything in this module changes the numbers fed to a model; it is
# part of the embedding contract id, so vectors from before and after never mix.
PREPROCESSING_VERSION = "bgr2rgb-nchw-v1"
FACE_SIZE = 112
# Input layouts of a graph: the normalised float32 blob ``to_blob`` makes (the default), or the
# raw uint8 BGR crops with the preprocessing as graph nodes (``models.preprocess_graph``).
NCHW_FLOAT = "nchw_float"
NHWC_UINT8 = "nhwc_uint8_bgr"
_ACCEPTED_DTYPES = (np.uint8, np.float32, np.float64)


@dataclass(frozen=True)
class Normalization:
    """Input scaling of one model: ``(x - mean) / std`` per channel after BGR->RGB.

    ``arcface_torch`` exports use 127.5 / 127.5; MXNet exports carry the
    normalisation inside the graph and use 0 / 1 (see ``detect_normalization``).
    """

    mean: float = 127.5
    std: float = 127.5
    swap_rb: bool = True

    @property
    def tag(self) -> str:
        order = "rgb" if self.swap_rb else "bgr"
        return f"{order}-mean{self.mean:g}-std{self.std:g}"


ARCFACE_TORCH = Normalization(127.5, 127.5)
MXNET_IN_GRAPH = Normalization(0.0, 1.0)


def detect_normalization(node_names: list[str]) -> Normalization:
    """Apply insightface's own rule: ``Sub``/``_minus`` and ``Mul``/``_mul`` among the
    first eight graph nodes mean the model normalises internally (MXNet export)."""
    head = node_names[:8]
    has_sub = any(n.startswith(("Sub", "_minus")) for n in head)
    has_mul = any(n.startswith(("Mul", "_mul")) for n in head)
    return MXNET_IN_GRAPH if (has_sub and has_mul) else ARCFACE_TORCH


def validate_faces(faces: object) -> np.ndarray:
    """Check the ``encode`` input contract and return a C-contiguous array.

    Accepts ``(N, 112, 112, 3)`` uint8 BGR, or float32/float64 in [0, 255]
    (decoders that hand out floats). Raises ``ValueError`` naming the problem.
    """
    if not isinstance(faces, np.ndarray):
        raise ValueError(
            f"faces must be a numpy array of shape (N, {FACE_SIZE}, {FACE_SIZE}, 3), "
            f"got {type(faces).__name__}"
        )
    if faces.ndim != 4:
        raise ValueError(
            f"faces must have rank 4 (N, {FACE_SIZE}, {FACE_SIZE}, 3), got rank {faces.ndim} "
            f"with shape {faces.shape}; wrap a single crop with faces[None]"
        )
    _, height, width, channels = faces.shape
    if (height, width) != (FACE_SIZE, FACE_SIZE):
        raise ValueError(
            f"faces must be aligned {FACE_SIZE}x{FACE_SIZE} crops, got {height}x{width}; "
            "align them first with engines.align.norm_crop(image, landmarks)"
        )
    if channels != 3:
        raise ValueError(f"faces must have 3 channels (BGR), got {channels}")
    if faces.dtype not in _ACCEPTED_DTYPES:
        raise ValueError(
            f"faces dtype must be uint8 (or float32/float64 in [0, 255]), got {faces.dtype}"
        )
    if faces.dtype != np.uint8 and faces.size:
        if not np.isfinite(faces).all():
            bad = int(np.count_nonzero(~np.isfinite(faces)))
            raise ValueError(f"faces contain {bad} NaN or infinite values")
        low, high = float(faces.min()), float(faces.max())
        if low < 0.0 or high > 255.0:
            raise ValueError(
                f"float faces must be pixel values in [0, 255], got range [{low:g}, {high:g}]"
            )
    return np.ascontiguousarray(faces)


def to_blob(
    faces: np.ndarray, norm: Normalization = ARCFACE_TORCH, out: np.ndarray | None = None
) -> np.ndarray:
    """``(N, 112, 112, 3)`` BGR -> ``(N, 3, 112, 112)`` float32 RGB, ``(x - mean) / std``.

    ``out`` lets a backend reuse a (pinned) buffer of at least that shape.
    """
    n = faces.shape[0]
    blob = (
        np.empty((n, 3, faces.shape[1], faces.shape[2]), np.float32)
        if out is None
        else out[:n]
    )
    mean = np.float32(norm.mean)
    scale = np.float32(1.0 / norm.std)
    for dst in range(3):
        src = 2 - dst if norm.swap_rb else dst
        np.subtract(faces[..., src], mean, out=blob[:, dst], dtype=np.float32)
    blob *= scale
    return blob


def l2_normalize(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Return unit-norm rows and the norms they had.

    The pre-normalisation norm is kept because it is a useful face-quality signal
    (blurry or occluded crops produce small norms); a zero row stays zero rather
    than becoming NaN.
    """
    features = np.asarray(features, dtype=np.float32)
    norms = np.linalg.norm(features, axis=1).astype(np.float32)
    safe = np.where(norms > 0, norms, np.float32(1.0))
    return (features / safe[:, None]).astype(np.float32, copy=False), norms
