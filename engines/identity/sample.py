"""A sample gallery for demos: the insightface faces, enrolled from jittered copies, with its
threshold measured on other jittered copies (never guessed).

Synthetic weights keep a jittered copy near its source only for small, unmirrored jitter
(``SAMPLE_JITTER``; README "Gallery and identify"), so that is what the demo enrolls and
probes; the threshold is the cosine at FAR <= 1e-2 on a labelled set of other jitters of all
seven faces (``engines.evaluate``), which is how a real model's threshold is set too.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..evaluate.labelled import identity_pairs
from ..evaluate.metrics import tar_at_far
from ..models.sample_faces import jitter_face, source_faces
from .gallery import enroll, open_gallery_store

SAMPLE_JITTER = 0.05
CALIBRATION_FAR = 1e-2


@dataclass(frozen=True)
class SampleGallery:
    uri: str
    enrolled: tuple[str, ...]
    stranger: str  # a sample face left out of the gallery
    threshold: float


def sample_jitters(face: int, count: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    source = source_faces()[face]
    return np.stack([jitter_face(source, rng, SAMPLE_JITTER, mirror=False) for _ in range(count)])


def make_sample_gallery(engine, root: Path, per_identity: int = 3) -> SampleGallery:
    """Enroll every sample face but the last into ``root`` (idempotent) and calibrate a threshold."""
    faces = source_faces()
    info = engine.info
    store = open_gallery_store(str(root), info.contract, info.model_id, info.embedding_dim)
    names, sources, crops = [], [], []
    for i in range(len(faces) - 1):
        for k, crop in enumerate(sample_jitters(i, per_identity, seed=i)):
            names.append(faces[i].name)
            sources.append(f"sample/{faces[i].name}/{k}")
            crops.append(crop)
    emb, norms = engine.encode_with_norms(np.stack(crops))
    enroll(store, names, sources, emb, norms)
    labelled = np.concatenate([sample_jitters(i, 3, seed=1000 + i) for i in range(len(faces))])
    identities = tuple(faces[i].name for i in range(len(faces)) for _ in range(3))
    pairs = identity_pairs(identities, 10**9, seed=0)
    vectors = engine.encode(labelled)
    scores = np.sum(vectors[pairs.first] * vectors[pairs.second], axis=1)
    threshold = tar_at_far(scores, pairs.same, CALIBRATION_FAR).threshold
    return SampleGallery(store.uri, tuple(sorted(set(names))), faces[-1].name, float(threshold))
