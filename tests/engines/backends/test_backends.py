"""The onnx and insightface backends on real faces, through the public facade."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from insightface.model_zoo import get_model

from engines import get_engine
from engines.errors import BackendUnavailable
from engines.models.sample_faces import load_tom_hanks


@pytest.fixture(scope="module")
def onnx_r50(r50_model):
    return get_engine("onnx", r50_model, batch_size=8, max_batch_size=8)


@pytest.fixture(scope="module")
def onnx_mbf(mbf_model):
    return get_engine("onnx", mbf_model, batch_size=4, max_batch_size=4)


@pytest.mark.slow
def test_tom_hanks_matches_insightface_get_feat(onnx_r50, r50_model):
    face = load_tom_hanks()
    reference = get_model(r50_model.path, providers=["CPUExecutionProvider"])
    reference.prepare(ctx_id=-1)
    theirs = reference.get_feat(face).ravel()
    theirs = theirs / np.linalg.norm(theirs)
    ours = onnx_r50.encode(face[None])[0]
    assert float(ours @ theirs) >= 0.99999
    assert abs(float(np.linalg.norm(ours)) - 1.0) < 1e-5


def test_onnx_and_insightface_backends_agree(onnx_mbf, mbf_model, faces):
    ref = get_engine("insightface", mbf_model)
    cos = (onnx_mbf.encode(faces) * ref.encode(faces)).sum(1)
    assert cos.min() >= 0.99999


@pytest.mark.parametrize("backend", ["onnx", "insightface"])
def test_zero_faces(backend, mbf_model):
    engine = get_engine(backend, mbf_model)
    out = engine.encode(np.zeros((0, 112, 112, 3), np.uint8))
    assert out.shape == (0, 512) and out.dtype == np.float32


@pytest.mark.parametrize("backend", ["onnx", "insightface"])
def test_batches_larger_than_max_are_chunked_with_identical_rows(backend, mbf_model, faces):
    small = get_engine(backend, mbf_model, batch_size=4, max_batch_size=4)
    big = get_engine(backend, mbf_model, batch_size=32, max_batch_size=32)
    a, b = small.encode(faces), big.encode(faces)  # 21 faces: chunks of 4 vs one batch
    assert a.shape == (len(faces), 512)
    np.testing.assert_allclose(a, b, atol=2e-6)


def test_float_and_non_contiguous_input(onnx_mbf, faces):
    ref = onnx_mbf.encode(faces[::2].copy())
    np.testing.assert_allclose(onnx_mbf.encode(faces[::2]), ref, atol=1e-6)
    np.testing.assert_allclose(onnx_mbf.encode(faces[::2].astype(np.float32)), ref, atol=1e-6)


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (np.zeros((112, 112, 3), np.uint8), "rank"),
        (np.zeros((1, 64, 64, 3), np.uint8), "112x112"),
        (np.zeros((1, 112, 112, 1), np.uint8), "channels"),
        (np.zeros((1, 112, 112, 3), np.int32), "dtype"),
        (np.full((1, 112, 112, 3), np.nan, np.float32), "NaN"),
        (np.full((1, 112, 112, 3), np.inf, np.float32), "infinite"),
    ],
)
def test_encode_rejects_bad_input(onnx_mbf, bad, message):
    with pytest.raises(ValueError, match=message):
        onnx_mbf.encode(bad)


def test_rows_are_unit_norm_with_norms_reported(onnx_mbf, faces):
    emb, norms = onnx_mbf.encode_with_norms(faces)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    assert np.all(norms > 0)


def test_concurrent_encodes_give_the_same_rows(onnx_mbf, faces):
    batch = faces[:6]  # 8 calls in 4 threads is the point, not the batch (21 faces took 5 s in the suite)
    expected = onnx_mbf.encode(batch)
    with ThreadPoolExecutor(4) as pool:
        outs = list(pool.map(lambda _: onnx_mbf.encode(batch), range(8)))
    for out in outs:
        np.testing.assert_allclose(out, expected, atol=1e-6)


@pytest.mark.slow
def test_info_carries_contract_and_diagnostics(onnx_mbf, mbf_model, r50_model):
    info = onnx_mbf.info.to_dict()
    for key in ("backend", "engine_path", "precision", "batch_size", "embedding_dim", "device",
                "model_sha256", "contract"):
        assert key in info
    assert info["backend"] == "onnx" and info["embedding_dim"] == 512
    # the sha256 of the graph that runs (the uint8-input variant by default), of the same weights
    assert info["model_sha256"] == onnx_mbf.graph.sha256 and info["model_path"] == onnx_mbf.graph.path
    assert onnx_mbf.graph.contract_sha256 == mbf_model.sha256
    assert "SYNTHETIC" in info["model_note"]
    ref_info = get_engine("insightface", mbf_model).info
    assert ref_info.contract == onnx_mbf.info.contract  # same weights, same space
    other = get_engine("onnx", r50_model, batch_size=1, max_batch_size=1).info
    assert other.contract != onnx_mbf.info.contract


def test_requesting_a_precision_the_onnx_backend_cannot_convert_to_is_refused(mbf_model):
    from engines.fallback import ChainExhausted

    # fp16 and int8 are graph conversions the onnx backend makes (precision.py); bf16 is not
    with pytest.raises(ChainExhausted, match="conversions"):
        get_engine("onnx", mbf_model, precision="bf16")


def test_gpu_device_without_gpu_build_says_what_is_available(mbf_model):
    from engines.fallback import ChainExhausted

    with pytest.raises(ChainExhausted, match="available"):
        get_engine("onnx", mbf_model, device="cuda:0")
    assert issubclass(BackendUnavailable, Exception)
