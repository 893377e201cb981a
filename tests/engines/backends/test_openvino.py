"""The CPU fast path: OpenVINO, ``auto`` precision, and the drift gate that guards it."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import numpy as np
import pytest

from engines import get_engine, load_config
from engines.backends.openvino import auto_precision, supported_precisions
from engines.errors import BackendUnavailable
from engines.fallback import ChainExhausted
from engines.hardware import cpu_has_bf16, cpu_has_fp16, cpu_has_int8_dot

needs_bf16 = pytest.mark.skipif(not cpu_has_bf16(), reason="CPU has no native bf16")


def _config(tmp_path, **validation):
    """The repo config with the cache (drift verdicts, converted graphs) in tmp_path."""
    cfg = load_config()
    return replace(
        cfg,
        storage=replace(cfg.storage, cache_dir=str(tmp_path)),
        validation=replace(cfg.validation, **validation),
    )


def _full_int8(cfg):
    """Every weighted layer in int8 (no search): the drifting int8 the gate must refuse."""
    return replace(cfg, quantization=replace(cfg.quantization, keep_fp32="none"))


@pytest.fixture(scope="module")
def reference(mbf_model, faces):
    return get_engine("insightface", mbf_model).encode(faces)


def test_fp32_matches_the_insightface_reference(mbf_model, faces, reference):
    engine = get_engine("openvino", mbf_model, precision="fp32")
    assert engine.info.precision == "fp32" and engine.info.backend == "openvino"
    cos = (engine.encode(faces) * reference).sum(1)
    assert cos.min() >= 0.99999


@needs_bf16
@pytest.mark.slow
def test_bf16_computes_in_bf16_in_the_fp32_contract_on_both_models(mbf_model, r50_model, faces):
    """How close bf16 comes is this CPU's to say and the gate's to judge (tests below); what
    holds everywhere is that it computes in bf16 and answers in the same vector space."""
    for model in (mbf_model, r50_model):
        ref = get_engine("insightface", model).encode(faces)
        # the gate off: this test measures the drift itself, whatever this CPU's bf16 gives
        engine = get_engine("openvino", model, precision="bf16", validate_on_startup=False)
        info = engine.info
        assert info.precision == "bf16"
        assert info.runtime["openvino"]["properties"]["INFERENCE_PRECISION_HINT"] == "bf16"
        # the fp32 contract: bf16 compute answers in the same vector space
        assert info.contract == get_engine("insightface", model).info.contract
        cos = (engine.encode(faces) * ref).sum(1)
        assert cos.min() > 0.99, (model.model_id, cos.min())  # the same network, not another one


def test_batches_split_across_streams_keep_their_order(mbf_model, faces):
    engine = get_engine("openvino", mbf_model, precision="fp32", batch_size=8, max_batch_size=8)
    assert engine.info.runtime["openvino"]["infer_requests"] >= 1
    together = engine.encode(faces)  # 21 faces: chunks of 8, each split across the streams
    one_by_one = np.concatenate([engine.encode(faces[i : i + 1]) for i in range(len(faces))])
    np.testing.assert_allclose(together, one_by_one, atol=1e-5)
    assert engine.encode(faces[:0]).shape == (0, 512)


def test_concurrent_calls_are_safe(mbf_model, faces):
    engine = get_engine("openvino", mbf_model, precision="fp32")
    expected = engine.encode(faces)
    with ThreadPoolExecutor(4) as pool:
        outs = list(pool.map(lambda _: engine.encode(faces), range(8)))
    for out in outs:
        np.testing.assert_allclose(out, expected, atol=1e-6)


def test_precision_the_cpu_lacks_is_refused_with_the_reason(mbf_model):
    missing = next((p for p, why in supported_precisions().items() if why), None)
    if missing is None:
        pytest.skip("this CPU runs every precision natively")
    with pytest.raises(ChainExhausted, match="needs native support"):
        get_engine("openvino", mbf_model, precision=missing)


def test_openvino_refuses_gpu_devices(mbf_model):
    from engines.backends.openvino import OpenVinoEngine
    from engines.base import EngineOptions

    with pytest.raises(BackendUnavailable, match="CPU only"):
        OpenVinoEngine(mbf_model, EngineOptions(device="cuda:0")).ensure_ready()


def test_auto_precision_order_follows_the_cpu():
    assert auto_precision(("fp32",)) == "fp32"
    assert auto_precision(("bf16", "fp32")) == ("bf16" if cpu_has_bf16() else "fp32")
    assert auto_precision(("fp16", "fp32")) == ("fp16" if cpu_has_fp16() else "fp32")


@needs_bf16
def test_auto_serves_bf16_exactly_when_the_gate_accepts_it_and_caches_the_verdict(
    mbf_model, tmp_path, monkeypatch
):
    cfg = _config(tmp_path)
    bound = 1 - cfg.validation.max_drift_cosine
    info = get_engine("auto", mbf_model, config=cfg).info
    bf16 = next(a for a in info.fallback["attempts"] if a["backend"] == "openvino")
    verdicts = list((tmp_path / "drift-gate").glob("openvino-bf16-*.json"))
    assert len(verdicts) == 1
    verdict = json.loads(verdicts[0].read_text())
    # what the configuration promises, whatever this CPU's bf16 gives: served iff within the bound
    assert verdict["passed"] == (verdict["min_cosine_sim"] >= bound) == (bf16["status"] == "selected")
    if bf16["status"] == "selected":
        assert (info.backend, info.precision) == ("openvino", "bf16") and bf16["drift"]["passed"]
    else:
        assert bf16["status"] == "drift_refused"
        assert (info.backend, info.precision) == ("openvino", "fp32")  # auto's retry, openvino:fp32

    # a second start on this CPU reads the verdict instead of embedding the eval set again
    import engines.drift_gate as drift_gate

    def no_rerun(*args, **kwargs):
        raise AssertionError("the drift gate ran again despite a cached verdict")

    monkeypatch.setattr(drift_gate, "run_embedding_regression_tests", no_rerun)
    again = get_engine("auto", mbf_model, config=cfg).info
    assert (again.backend, again.precision) == (info.backend, info.precision)


@pytest.mark.slow
@pytest.mark.skipif(not cpu_has_int8_dot(), reason="CPU has no int8 dot product")
def test_gate_refuses_a_drifting_reduced_precision_and_auto_retries_in_fp32(mbf_model, tmp_path):
    # full int8 drifts past 0.001 on these networks; auto must not serve it
    cfg = _full_int8(_config(tmp_path))
    cfg = replace(cfg, openvino=replace(cfg.openvino, auto_precisions=("int8", "fp32")))
    engine = get_engine("openvino", mbf_model, config=cfg)
    info = engine.info
    assert (info.backend, info.precision) == ("openvino", "fp32")
    first, second = info.fallback["attempts"]
    assert first["backend"] == "openvino" and first["status"] == "drift_refused"
    assert first["drift"]["min_cosine_sim"] < 0.999 and "drift gate refused" in first["reason"]
    assert second["backend"] == "openvino:fp32" and second["status"] == "selected"


@pytest.mark.slow
@pytest.mark.skipif(not cpu_has_int8_dot(), reason="CPU has no int8 dot product")
def test_explicit_reduced_precision_is_gated_too(mbf_model, tmp_path):
    with pytest.raises(ChainExhausted, match="drift gate refused"):
        get_engine("openvino", mbf_model, precision="int8", config=_full_int8(_config(tmp_path)))
    # ... unless the gate is switched off on purpose
    cfg = _full_int8(_config(tmp_path, gate_reduced_precision=False))
    assert get_engine("openvino", mbf_model, precision="int8", config=cfg).info.precision == "int8"


@pytest.mark.slow
@pytest.mark.skipif(not cpu_has_int8_dot(), reason="CPU has no int8 dot product")
def test_mixed_int8_passes_the_gate_that_refuses_full_int8(mbf_model, int8_cache):
    """The searched layers in fp32 (quantization.keep_fp32: auto), the rest int8: the gate serves it."""
    cfg = _config(int8_cache)
    cfg = replace(cfg, quantization=replace(cfg.quantization, calibration_faces=16, search_faces=32))
    engine = get_engine("openvino", mbf_model, precision="int8", config=cfg)
    info = engine.info
    assert info.precision == "int8"
    attempt = info.fallback["attempts"][0]
    assert attempt["status"] == "selected"
    assert attempt["drift"]["min_cosine_sim"] >= 1 - cfg.validation.max_drift_cosine


def test_auto_retries_each_lower_native_precision_of_its_order_then_fp32():
    """int8 refused by the gate: bf16 next (where native), then fp32, never a precision the CPU lacks."""
    from engines.factory import with_precision_retries

    cfg = load_config()
    cfg = replace(cfg, openvino=replace(cfg.openvino, auto_precisions=("int8", "bf16", "fp32")))
    native = [p for p in ("int8", "bf16") if supported_precisions()[p] is None]
    retries = [f"openvino:{p}" for p in native[1:]] + ["openvino:fp32"]
    assert with_precision_retries(["openvino", "onnx"], "auto", cfg) == ["openvino", *retries, "onnx"]
    assert with_precision_retries(["openvino", "onnx"], "int8", cfg) == ["openvino", "onnx"]
