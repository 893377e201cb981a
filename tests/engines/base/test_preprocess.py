from __future__ import annotations

import cv2
import numpy as np
import pytest

from engines.base.preprocess import (
    ARCFACE_TORCH,
    MXNET_IN_GRAPH,
    detect_normalization,
    l2_normalize,
    to_blob,
    validate_faces,
)


def _cv2_blob(faces, mean=127.5, std=127.5):
    return cv2.dnn.blobFromImages(list(faces), 1.0 / std, (112, 112), (mean,) * 3, swapRB=True)


def test_blob_is_bit_identical_to_insightface_blobfromimages(faces):
    assert np.array_equal(to_blob(faces), _cv2_blob(faces))


def test_blob_is_bit_identical_for_float32_input(faces):
    f32 = faces.astype(np.float32)
    assert np.array_equal(to_blob(f32), _cv2_blob(f32))
    assert np.array_equal(to_blob(f32), to_blob(faces))


def test_mxnet_normalisation_matches_blobfromimages(faces):
    assert np.array_equal(to_blob(faces, MXNET_IN_GRAPH), _cv2_blob(faces, 0.0, 1.0))


def test_blob_is_rgb_nchw(faces):
    blob = to_blob(faces[:1])
    # channel 0 of the blob is the R channel, which is index 2 in BGR
    expected = (faces[0, :, :, 2].astype(np.float32) - 127.5) / 127.5
    np.testing.assert_allclose(blob[0, 0], expected, atol=1e-6)


def test_detect_normalization_follows_insightface_rule():
    assert detect_normalization(["Conv_0", "PRelu_1"]) == ARCFACE_TORCH
    assert detect_normalization(["_minus0", "_mulscalar0", "conv"]) == MXNET_IN_GRAPH
    assert detect_normalization(["Sub_1", "Mul_2"]) == MXNET_IN_GRAPH
    # only the first eight nodes count
    assert detect_normalization([f"n{i}" for i in range(8)] + ["Sub", "Mul"]) == ARCFACE_TORCH


@pytest.mark.parametrize(
    ("array", "message"),
    [
        (np.zeros((112, 112, 3), np.uint8), "rank 4"),
        (np.zeros((2, 100, 112, 3), np.uint8), "112x112"),
        (np.zeros((2, 112, 112, 4), np.uint8), "3 channels"),
        (np.zeros((2, 112, 112, 1), np.uint8), "3 channels"),
        (np.zeros((2, 112, 112, 3), np.int16), "dtype"),
        (np.zeros((2, 112, 112, 3), np.float16), "dtype"),
        (np.full((1, 112, 112, 3), np.nan, np.float32), "NaN"),
        (np.full((1, 112, 112, 3), np.inf, np.float64), "infinite"),
        (np.full((1, 112, 112, 3), 300.0, np.float32), r"\[0, 255\]"),
        (np.full((1, 112, 112, 3), -1.0, np.float32), r"\[0, 255\]"),
    ],
)
def test_validate_faces_rejects_bad_input(array, message):
    with pytest.raises(ValueError, match=message):
        validate_faces(array)


def test_validate_faces_rejects_non_arrays():
    with pytest.raises(ValueError, match="numpy array"):
        validate_faces([[1, 2, 3]])


def test_validate_faces_accepts_non_contiguous(faces):
    strided = faces[::2]
    assert not strided.flags.c_contiguous
    out = validate_faces(strided)
    assert out.flags.c_contiguous and np.array_equal(out, strided)


def test_l2_normalize_returns_unit_rows_and_norms():
    x = np.array([[3.0, 4.0], [0.0, 0.0]], np.float32)
    unit, norms = l2_normalize(x)
    np.testing.assert_allclose(norms, [5.0, 0.0])
    np.testing.assert_allclose(unit[0], [0.6, 0.8])
    assert np.all(unit[1] == 0)  # zero stays zero, never NaN
