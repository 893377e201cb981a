"""Real faces from the images the ``insightface`` package ships, and jittered sets of them.

Nothing may be downloaded at run time, yet drift gates, benchmarks and demos
should see faces rather than noise: activations (and so fp16/int8 error) depend
on the input statistics. The package ships one aligned crop and a group photo;
their landmarks live in ``assets/insightface_faces.json``.
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import cv2
import numpy as np

from ..base.align import ARCFACE_TEMPLATE, norm_crop
from ..errors import EngineError

_ASSETS = Path(__file__).with_name("assets")


def insightface_images_dir() -> Path:
    """Directory of the sample images inside the installed ``insightface`` package."""
    spec = importlib.util.find_spec("insightface")
    if spec is None or not spec.submodule_search_locations:
        raise EngineError("the 'insightface' package is not installed; it ships the sample faces")
    return Path(next(iter(spec.submodule_search_locations))) / "data" / "images"


def _read_image(name: str) -> np.ndarray:
    path = insightface_images_dir() / name
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None:
        raise EngineError(f"cannot read sample image {path}")
    return image


def load_tom_hanks() -> np.ndarray:
    """The aligned 112x112 BGR crop insightface ships (PNG: lossless, identical everywhere)."""
    return _read_image("Tom_Hanks_54745.png")


@dataclass(frozen=True)
class SourceFace:
    """One real face: its source image, landmarks in it, and the aligned crop."""

    name: str
    image_file: str
    image: np.ndarray
    landmarks: np.ndarray

    @property
    def crop(self) -> np.ndarray:
        return norm_crop(self.image, self.landmarks)


@lru_cache(maxsize=1)
def source_faces() -> tuple[SourceFace, ...]:
    spec = json.loads((_ASSETS / "insightface_faces.json").read_text())
    images: dict[str, np.ndarray] = {}
    faces = []
    for entry in spec["faces"]:
        image = images.setdefault(entry["image"], _read_image(entry["image"]))
        landmarks = entry["landmarks"]
        kps = ARCFACE_TEMPLATE.copy() if landmarks is None else np.asarray(landmarks, np.float32)
        faces.append(SourceFace(entry["name"], entry["image"], image, kps))
    return tuple(faces)


@dataclass(frozen=True)
class FaceSet:
    """Aligned crops with the identity each came from (for top-1 identity checks)."""

    faces: np.ndarray  # (N, 112, 112, 3) uint8 BGR
    labels: np.ndarray  # (N,) int, index into names
    names: tuple[str, ...]


def jitter_face(face: SourceFace, rng: np.random.Generator, strength: float = 1.0,
                mirror: bool = True) -> np.ndarray:
    """One aligned crop of ``face`` with detector-like landmark noise and photometric change.

    Landmarks move by a shared shift, a small rotation/scale and per-point noise
    (what two detections of one face in consecutive video frames differ by);
    brightness and contrast change; with ``mirror``, one crop in four is mirrored.

    Identity tests need ``mirror=False`` and a small ``strength``: seeded (synthetic)
    weights are not mirror-invariant (a crop and its mirror image: cosine 0.0-0.4 on
    synthetic:mobilefacenet) and keep a jittered copy closer to its source than to
    any other face only for strength <= ~0.1 (README "Gallery and identify").
    """
    kps = face.landmarks.astype(np.float64)
    center = kps.mean(axis=0)
    angle = np.deg2rad(rng.normal(0.0, 4.0 * strength))
    scale = 1.0 + rng.normal(0.0, 0.04 * strength)
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]]) * scale
    eye_dist = float(np.linalg.norm(kps[1] - kps[0])) or 1.0
    kps = (kps - center) @ rot.T + center
    kps += rng.normal(0.0, 0.03 * eye_dist * strength, 2)
    kps += rng.normal(0.0, 0.015 * eye_dist * strength, kps.shape)
    crop = norm_crop(face.image, kps.astype(np.float32)).astype(np.float32)
    gain = 1.0 + rng.normal(0.0, 0.12 * strength)
    offset = rng.normal(0.0, 10.0 * strength)
    crop = np.clip(crop * gain + offset, 0, 255).astype(np.uint8)
    if mirror and rng.random() < 0.25:
        crop = np.ascontiguousarray(crop[:, ::-1])
    return crop


def jittered_faces(n: int, seed: int = 0, strength: float = 1.0, mirror: bool = True) -> FaceSet:
    """``n`` crops cycling through the real faces, each jittered (seeded, reproducible)."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    sources = source_faces()
    rng = np.random.default_rng(seed)
    faces = np.empty((n, 112, 112, 3), np.uint8)
    labels = np.arange(n) % len(sources)
    for i, label in enumerate(labels):
        faces[i] = jitter_face(sources[label], rng, strength, mirror)
    return FaceSet(faces, labels, tuple(f.name for f in sources))


def eval_faces(n: int, seed: int = 0) -> np.ndarray:
    """The evaluation set the drift gate and ``arcface compare`` use."""
    return jittered_faces(n, seed).faces
