"""Identities made of jittered copies of the real faces insightface ships, for gallery tests.

Synthetic (seeded) weights identify nobody, but they keep a lightly jittered, unmirrored copy
of a face closer to its source than to any other face: on synthetic:mobilefacenet at strength
0.05, min same-source cosine 0.76 against max other-source cosine 0.39 (0.10: 0.57 vs 0.43;
0.20 and up: no margin; a mirrored crop: cosine -0.03..0.40 to its source). ``JITTER`` is the
strength with a clear margin; ``test_the_margin_identity_tests_rely_on`` checks it."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from engines import jitter_face, source_faces

JITTER = 0.05
THRESHOLD = 0.6  # between the two: what a calibration on these faces gives (README)


def jitters(face_index: int, count: int, seed: int) -> np.ndarray:
    face = source_faces()[face_index]
    rng = np.random.default_rng(seed)
    return np.stack([jitter_face(face, rng, JITTER, mirror=False) for _ in range(count)])


def gallery_dir(root: Path, faces: range | list[int], per_identity: int = 3, seed: int = 0) -> Path:
    """``root/<face name>/<k>.png``: the enroll layout, ``per_identity`` jitters of each face."""
    for i in faces:
        folder = root / source_faces()[i].name
        folder.mkdir(parents=True, exist_ok=True)
        for k, crop in enumerate(jitters(i, per_identity, seed + i)):
            cv2.imwrite(str(folder / f"{k}.png"), crop)
    return root


def enroll_jitters(engine, store, faces, per_identity: int = 3, seed: int = 0):
    """Enroll ``per_identity`` jitters of each face index in ``faces`` (identity = the face's
    name, source ``<index>/<k>``) with ``engine`` into the gallery ``store``; the new identities table."""
    from engines.identity.gallery import enroll

    names, sources, crops = [], [], []
    for i in faces:
        for k, crop in enumerate(jitters(i, per_identity, seed + i)):
            names.append(source_faces()[i].name)
            sources.append(f"{i}/{k}")
            crops.append(crop)
    emb, norms = engine.encode_with_norms(np.stack(crops))
    return enroll(store, names, sources, emb, norms)
