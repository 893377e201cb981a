from __future__ import annotations

from dataclasses import replace

import pytest

from engines import get_engine, load_config
from engines.base import EngineOptions
from engines.errors import BackendUnavailable
from engines.factory import _drift_gate, backend_chain, make_engine
from engines.fallback import ChainExhausted, start_chain
from engines.onnx_backend import OnnxEngine
from engines.preprocess import Normalization


class BgrFeedingEngine(OnnxEngine):
    @property
    def normalization(self) -> Normalization:
        return Normalization(127.5, 127.5, swap_rb=False)


def test_auto_chain_on_cpu_ends_with_onnx_and_reference():
    chain = backend_chain("auto", ("onnx", "insightface"), "cpu")
    assert chain[-2:] == ["onnx", "insightface"]
    assert len(chain) == len(set(chain))
    assert backend_chain("tensorrt", ("onnx", "insightface"), "cuda:0") == [
        "tensorrt", "onnx", "insightface"]


def test_unavailable_backend_yields_to_next_with_reason_in_info(mbf_model):
    engine = get_engine("tensorrt", mbf_model, fallback=["onnx", "insightface"])
    info = engine.info
    assert info.backend == "onnx"
    attempts = info.fallback["attempts"]
    assert attempts[0]["backend"] == "tensorrt" and attempts[0]["status"] == "unavailable"
    assert attempts[0]["reason"]
    assert attempts[-1] == {**attempts[-1], "backend": "onnx", "status": "selected"}


def test_drift_gate_refuses_a_drifting_backend_and_falls_back(mbf_model):
    cfg = load_config()
    cfg = replace(cfg, validation=replace(cfg.validation, run_on_startup=True, eval_set_size=14))
    gate = _drift_gate(cfg, mbf_model, "cpu")

    def make(name):
        if name == "buggy":
            return BgrFeedingEngine(mbf_model, EngineOptions())
        return make_engine(name, mbf_model, cfg, "cpu")

    engine, report = start_chain("buggy", ["buggy", "onnx"], make, gate)
    assert engine.name == "onnx"
    first, second = report.attempts
    assert first.status == "drift_refused" and "drift gate" in first.reason
    assert first.drift["min_cosine_sim"] < 0.999
    assert second.status == "selected" and second.drift["passed"]


def test_exhausted_chain_lists_every_reason(mbf_model):
    # bf16: TensorRT builds fp32/fp16/int8 graphs only; the onnx backend converts to fp16/int8 only
    with pytest.raises(ChainExhausted) as info:
        get_engine("tensorrt", mbf_model, fallback=["onnx"], precision="bf16")
    message = str(info.value)
    assert "tensorrt" in message and "onnx" in message
    assert isinstance(info.value, BackendUnavailable)


def test_unknown_backend_name_is_a_value_error(mbf_model):
    with pytest.raises(ValueError, match="unknown backend"):
        get_engine("trt", mbf_model)
