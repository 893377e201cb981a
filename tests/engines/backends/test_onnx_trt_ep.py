"""ONNX Runtime's TensorRT EP as a provider of the onnx backend: options and build reporting."""

from __future__ import annotations

from pathlib import Path

from engines.backends.onnx import OnnxEngine, graph_input_name, onnxruntime_build, tensorrt_ep_options
from engines.base import EngineOptions
from engines.config import OnnxConfig
from engines.models.precision import convert_model


def test_trt_ep_options_profile_the_real_input_and_cache_inside_our_cache(mbf_model, tmp_path):
    fp16 = convert_model(mbf_model, "fp16", cache_dir=str(tmp_path))
    name = graph_input_name(fp16.path)
    import onnx

    assert name == onnx.load(fp16.path, load_external_data=False).graph.input[0].name
    opts = tensorrt_ep_options(fp16, name, str(tmp_path), opt_batch=32, max_batch=128, workspace_mb=1024)
    assert opts["trt_profile_min_shapes"] == f"{name}:1x3x112x112"
    assert opts["trt_profile_opt_shapes"] == f"{name}:32x3x112x112"
    assert opts["trt_profile_max_shapes"] == f"{name}:128x3x112x112"
    assert opts["trt_max_workspace_size"] == 1024 << 20
    cache = Path(opts["trt_engine_cache_path"])
    assert cache.is_relative_to(tmp_path) and opts["trt_timing_cache_path"] == str(cache)
    assert opts["trt_engine_cache_enable"] and opts["trt_timing_cache_enable"]
    assert fp16.sha256[:8] in opts["trt_engine_cache_prefix"] and "fp16" in opts["trt_engine_cache_prefix"]
    assert "trt_fp16_enable" not in opts  # precision lives in the graph
    off = tensorrt_ep_options(fp16, name, str(tmp_path), 32, 128, 1024, engine_cache=False)
    assert "trt_engine_cache_enable" not in off


def test_cpu_sessions_never_get_trt_ep_options(mbf_model):
    settings = OnnxConfig(providers=("TensorrtExecutionProvider", "CPUExecutionProvider"))
    engine = OnnxEngine(mbf_model, EngineOptions(device="cpu"), settings)
    assert engine._tensorrt_ep() == {}


def test_onnxruntime_build_says_which_distribution_is_in_charge():
    import importlib.metadata as md

    import onnxruntime as ort

    build = onnxruntime_build()
    assert build["version"] == ort.__version__
    assert build["in_charge"] in build["distributions"]
    for dist, version in build["distributions"].items():
        assert md.version(dist) == version
    assert ("warning" in build) == (len(build["distributions"]) == 2)
    assert build["gpu_build"] == any(
        p in build["available_providers"] for p in ("CUDAExecutionProvider", "TensorrtExecutionProvider"))


def test_trt_ep_profile_follows_a_uint8_input_graph(mbf_model, tmp_path):
    from engines.models.preprocess_graph import with_uint8_input

    u8 = with_uint8_input(mbf_model, str(tmp_path))
    name = graph_input_name(u8.path)
    opts = tensorrt_ep_options(u8, name, str(tmp_path), opt_batch=32, max_batch=128, workspace_mb=1024)
    assert opts["trt_profile_opt_shapes"] == f"{name}:32x112x112x3"
