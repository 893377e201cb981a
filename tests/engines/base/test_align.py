from __future__ import annotations

import numpy as np
import pytest
from insightface.utils import face_align

from engines.base.align import ARCFACE_TEMPLATE, norm_crop
from engines.models.sample_faces import source_faces


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_norm_crop_matches_insightface_exactly_on_real_landmarks():
    faces = source_faces()
    rng = np.random.default_rng(0)
    compared = 0
    for face in faces:
        for _ in range(10):
            kps = (face.landmarks + rng.normal(0, 2.0, (5, 2))).astype(np.float32)
            ours = norm_crop(face.image, kps)
            theirs = face_align.norm_crop(face.image, kps)
            assert np.array_equal(ours, theirs), face.name
            compared += 1
    assert compared == 10 * len(faces)


def test_template_landmarks_give_identity_warp():
    face = source_faces()[-1]  # Tom Hanks, already aligned
    crop = norm_crop(face.image, ARCFACE_TEMPLATE)
    assert np.abs(crop.astype(int) - face.image.astype(int)).max() <= 1


@pytest.mark.parametrize("kps", [np.zeros((4, 2)), np.zeros((5, 3)), np.full((5, 2), np.nan)])
def test_bad_landmarks_are_rejected(kps):
    with pytest.raises(ValueError, match="landmarks"):
        norm_crop(np.zeros((200, 200, 3), np.uint8), kps)


def test_bad_image_is_rejected():
    with pytest.raises(ValueError, match=r"\(H, W, 3\)"):
        norm_crop(np.zeros((200, 200), np.uint8), ARCFACE_TEMPLATE)
