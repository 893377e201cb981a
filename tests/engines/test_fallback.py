from __future__ import annotations

from dataclasses import replace

import pytest

from engines import get_engine, load_config
from engines.backends.onnx import OnnxEngine
from engines.base import EngineOptions
from engines.base.preprocess import Normalization
from engines.drift_gate import startup_gate
from engines.errors import BackendUnavailable
from engines.factory import _reference_maker, backend_chain, make_engine
from engines.fallback import ChainExhausted, start_chain


class BgrFeedingEngine(OnnxEngine):
    runs_uint8_graph = False  # its (wrong) preprocessing is the host's: the blob it builds

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


def _config(tmp_path, **validation):
    """The repo config with the cache (drift verdicts) in tmp_path: the gate must measure,
    not read a verdict an earlier run left in ~/.cache."""
    cfg = load_config()
    return replace(
        cfg,
        storage=replace(cfg.storage, cache_dir=str(tmp_path)),
        validation=replace(cfg.validation, **validation),
    )


def test_drift_gate_refuses_a_drifting_backend_and_falls_back(mbf_model, tmp_path):
    cfg = _config(tmp_path, run_on_startup=True, eval_set_size=14)
    gate = startup_gate(cfg, mbf_model, _reference_maker(cfg, mbf_model))

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
    assert sorted(p.name for p in (tmp_path / "drift-gate").iterdir())  # measured, then cached here


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


def test_a_gate_that_cannot_run_skips_that_candidate_with_its_reason(mbf_model):
    def make(name):
        return make_engine(name, mbf_model, load_config(), "cpu")

    def gate(engine):
        if engine.name == "onnx":
            raise BackendUnavailable("reference exploded")
        return None

    engine, report = start_chain("onnx", ["onnx", "insightface"], make, gate)
    assert engine.name == "insightface"
    first, second = report.attempts
    assert first.backend == "onnx" and first.status == "gate_failed"
    assert "drift gate could not run" in first.reason and "reference exploded" in first.reason
    assert second.status == "selected"


def test_a_reference_that_cannot_start_exhausts_the_chain_with_a_clear_reason(
    mbf_model, tmp_path, monkeypatch
):
    from engines.backends.insightface import InsightFaceEngine

    monkeypatch.setattr(InsightFaceEngine, "availability", classmethod(lambda cls: "not installed (test)"))
    cfg = _config(tmp_path, run_on_startup=True, eval_set_size=4, reference_backend="insightface")
    make = lambda name: make_engine(name, mbf_model, cfg, "cpu")  # noqa: E731
    with pytest.raises(ChainExhausted) as info:
        gate = startup_gate(cfg, mbf_model, _reference_maker(cfg, mbf_model))
        start_chain("onnx", ["onnx", "insightface"], make, gate)
    onnx, insightface = info.value.report.attempts
    assert onnx.status == "gate_failed"
    assert "reference backend 'insightface'" in onnx.reason and "pip install -e ." in onnx.reason
    assert insightface.status == "unavailable"  # the reference itself cannot start either
    assert "reference backend 'insightface'" in str(info.value)
    assert not (tmp_path / "drift-gate").exists()  # no verdict is cached for an unmeasured candidate


def test_a_preprocessing_or_package_change_is_measured_again_not_read_from_the_cache(
    mbf_model, tmp_path, monkeypatch
):
    import json

    from engines import drift_gate
    from engines.base import preprocess

    cfg = _config(tmp_path, run_on_startup=True, eval_set_size=8)
    gate = startup_gate(cfg, mbf_model, _reference_maker(cfg, mbf_model))
    buggy = BgrFeedingEngine(mbf_model, EngineOptions())
    assert not gate(buggy).passed
    cached = drift_gate.verdict_path(cfg, mbf_model, buggy)
    forged = {**json.loads(cached.read_text()), "passed": True}
    cached.write_text(json.dumps(forged))
    assert gate(buggy).passed  # the same code reads the cached verdict back
    for patch in (lambda: monkeypatch.setattr(preprocess, "PREPROCESSING_VERSION", "changed-v2"),
                  lambda: monkeypatch.setattr(drift_gate, "package_version", lambda: "99.0")):
        patch()
        assert drift_gate.verdict_path(cfg, mbf_model, buggy) != cached
        assert not gate(buggy).passed  # new code: measured, so the forged "pass" cannot hide it
        cached = drift_gate.verdict_path(cfg, mbf_model, buggy)


class SizingBugEngine(OnnxEngine):
    """A real onnx backend whose start-up then fails the way the TensorRT runner once did: a
    ``ValueError`` sizing buffers from -1 dims. Not an ``EngineError``: the chain must still move on."""

    def _start(self) -> None:
        super()._start()
        raise ValueError("engine input is (N, (3, -1, -1)), got (1, 3, 112, 112)")


def test_any_start_up_error_is_a_failed_start_with_its_reason_and_the_next_backend_serves(
        mbf_model, caplog):
    import logging

    def make(name):
        if name == "sizing-bug":
            return SizingBugEngine(mbf_model, EngineOptions(device="cpu"))
        return make_engine(name, mbf_model, load_config(), "cpu")

    with caplog.at_level(logging.WARNING, logger="engines.fallback"):
        engine, report = start_chain("sizing-bug", ["sizing-bug", "onnx"], make)
    assert engine.name == "onnx"
    first, second = report.attempts
    assert first.status == "failed" and first.reason.startswith("could not start: ValueError: engine input")
    assert second.status == "selected"
    assert "Traceback" in caplog.text  # an unexpected error type may be a bug: its traceback is logged
