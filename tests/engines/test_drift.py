from __future__ import annotations

import numpy as np
import pytest

from engines import compare_embeddings, get_engine, run_embedding_regression_tests
from engines.backends.onnx import OnnxEngine
from engines.base import EngineOptions
from engines.base.preprocess import Normalization


class BgrFeedingEngine(OnnxEngine):
    """The classic drift bug (InsightFace-REST's TensorRT path since 2023): BGR into an
    RGB-trained model. A real ONNX Runtime session with a real preprocessing mistake."""

    runs_uint8_graph = False  # its (wrong) preprocessing is the host's: the blob it builds

    @property
    def normalization(self) -> Normalization:
        return Normalization(127.5, 127.5, swap_rb=False)


def test_identical_embeddings_have_no_drift():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(50, 512)).astype(np.float32)
    report = compare_embeddings(a, a * 3.0).gate(0.001)  # scale does not matter
    assert report.min_cosine_sim == pytest.approx(1.0, abs=1e-6)
    assert report.decision_flip_rate == 0.0 and report.passed
    assert len(report.histogram_counts) == 20 and sum(report.histogram_counts) == 50
    assert len(report.histogram_edges) == 21


def test_worst_face_and_percentiles_are_reported():
    rng = np.random.default_rng(1)
    a = rng.normal(size=(100, 512))
    b = a + rng.normal(scale=0.01, size=a.shape)
    b[37] = rng.normal(size=512)  # one face completely off
    report = compare_embeddings(a, b).gate(0.001)
    assert report.max_drift_face_idx == 37
    assert report.min_cosine_sim < 0.2 < report.p01_cosine_sim
    assert not report.passed
    assert 0.0 < report.decision_flip_rate < 0.1


def test_decision_flips_are_counted():
    # four faces on a line: 0-1 close, 2-3 close; moving 1 next to 2 flips decisions
    a = np.array([[1, 0.0], [0.99, 0.14], [0.0, 1], [0.14, 0.99]])
    b = a.copy()
    b[1] = [0.1, 0.995]
    assert compare_embeddings(a, b).decision_flip_rate > 0


def test_shape_mismatch_is_rejected():
    with pytest.raises(ValueError, match="equal shape"):
        compare_embeddings(np.zeros((3, 512)), np.zeros((4, 512)))


def test_regression_passes_for_onnx_vs_reference(mbf_model, faces):
    ref = get_engine("insightface", mbf_model)
    cand = get_engine("onnx", mbf_model)
    report = run_embedding_regression_tests(faces, ref, cand, max_drift=1e-5)
    assert report.passed and report.min_cosine_sim >= 0.99999


def test_regression_catches_bgr_fed_to_rgb_model(mbf_model, faces):
    ref = get_engine("insightface", mbf_model)
    buggy = BgrFeedingEngine(mbf_model, EngineOptions())
    report = run_embedding_regression_tests(faces, ref, buggy, max_drift=0.001)
    assert not report.passed
    assert report.min_cosine_sim < 0.99
