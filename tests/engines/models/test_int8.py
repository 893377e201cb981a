"""Mixed int8: the Q/DQ graph's recipe, the sensitivity search, its cache and its bound.

Bounds asserted are the configuration's (``quantization.target_min_cosine``, the drift
gate's ``1 - max_drift_cosine``), never what this CPU measured. The default placement
(``quantize_outputs: never``) runs on ONNX Runtime's CPU provider as fp32 arithmetic on
dequantised values (no QLinearConv fusion without the output Q), so its drift is the
quantisation's own on every CPU, AVX2 included.
"""

from __future__ import annotations

import json
from dataclasses import replace

import onnx
import onnxruntime as ort
import pytest

from engines.config.schema import QuantizationConfig
from engines.drift_gate import conversion_drift
from engines.models import int8_search
from engines.models.int8_recipe import for_backend, weighted_layers
from engines.models.int8_search import _Simulator, find_keep_fp32, search_path
from engines.models.precision import convert_model
from engines.models.sample_faces import eval_faces

# small enough for the suite: the search's faces are the gate's 32 eval faces
SEARCH = QuantizationConfig(calibration_faces=16, search_faces=32)
FULL = replace(SEARCH, keep_fp32="none")


def _props(path: str) -> dict[str, str]:
    return {p.key: p.value for p in onnx.load(path, load_external_data=False).metadata_props}


@pytest.fixture(scope="module")
def cache(int8_cache) -> str:
    return str(int8_cache)


@pytest.fixture(scope="module")
def full(mbf_model, cache):
    return convert_model(mbf_model, "int8", cache_dir=cache, quantization=FULL)


@pytest.fixture(scope="module")
def mixed(mbf_model, cache):
    return convert_model(mbf_model, "int8", cache_dir=cache, quantization=SEARCH)


def test_full_int8_records_its_recipe_in_the_graph(full):
    props = _props(full.path)
    recipe = json.loads(props["arcface_ray.recipe"])
    assert recipe["keep_fp32"] == [] and json.loads(props["arcface_ray.int8_keep_fp32"]) == []
    assert recipe["per_channel"] is True and recipe["weight_type"] == "QInt8"
    assert recipe["calibrate_method"] == "Percentile" and recipe["calibration_percentile"] == 99.999
    assert recipe["calibration_size"] == FULL.calibration_faces
    assert recipe["extra_options"]["QuantizeBias"] is False
    assert json.loads(props["arcface_ray.int8_search"]) == {"keep_fp32": "none: every weighted layer in int8"}


@pytest.mark.slow
def test_mixed_int8_records_the_search_and_keeps_its_layers_in_fp32(mixed, full):
    props = _props(mixed.path)
    recipe = json.loads(props["arcface_ray.recipe"])
    search = json.loads(props["arcface_ray.int8_search"])
    keep = recipe["keep_fp32"]
    assert keep and search["keep_fp32"] == keep == json.loads(props["arcface_ray.int8_keep_fp32"])
    assert search["target_min_cosine"] == SEARCH.target_min_cosine
    assert search["search_faces"] == SEARCH.search_faces
    assert search["min_cosine"] >= SEARCH.target_min_cosine
    assert 0.0 <= search["int8_mac_share"] < 1.0
    # keep_fp32 none vs auto: another graph, and exactly the kept layers lost their Q/DQ
    assert mixed.path != full.path and mixed.sha256 != full.sha256
    int8_full = set(weighted_layers(onnx.load(full.path)))
    int8_mixed = set(weighted_layers(onnx.load(mixed.path)))
    assert int8_mixed == int8_full - set(keep) and int8_mixed


@pytest.mark.slow
def test_mixed_int8_meets_the_search_bound_and_the_drift_gate(mixed, mbf_model, cache):
    sim = _Simulator(mbf_model, eval_faces(SEARCH.search_faces))
    assert sim.cosines(onnx.load(mixed.path)).min() >= SEARCH.target_min_cosine
    drift = conversion_drift(mbf_model, mixed, n_faces=32, max_drift=0.001, cache_dir=cache)
    assert drift["passed"] and drift["min_cosine_sim"] >= 0.999


@pytest.mark.slow
def test_the_search_is_cached(mixed, mbf_model, cache, monkeypatch):
    def no_rerun(*args, **kwargs):
        raise AssertionError("the int8 search ran again despite its cached result")

    monkeypatch.setattr(int8_search, "run_search", no_rerun)
    first = json.loads(search_path(mbf_model, SEARCH, cache).read_text())
    assert find_keep_fp32(mbf_model, SEARCH, cache) == first
    again = convert_model(mbf_model, "int8", cache_dir=cache, quantization=SEARCH)
    assert again.path == mixed.path and again.sha256 == mixed.sha256


def test_the_search_is_keyed_on_every_setting_it_depends_on(mbf_model, tmp_path):
    base = search_path(mbf_model, SEARCH, str(tmp_path))
    changes = {"target_min_cosine": 0.9995, "search_faces": 64, "calibration_faces": 32,
               "calibration_method": "minmax", "calibration_percentile": 99.99, "quantize_outputs": "always"}
    for key, value in changes.items():
        assert search_path(mbf_model, replace(SEARCH, **{key: value}), str(tmp_path)) != base, key
    # never is what auto means without a backend: the same graph, so the same search
    assert search_path(mbf_model, replace(SEARCH, quantize_outputs="never"), str(tmp_path)) == base


def test_quantize_outputs_follows_the_backend():
    assert for_backend(SEARCH, "onnx").quantize_outputs == "always"
    assert for_backend(SEARCH, "openvino").quantize_outputs == "never"
    assert for_backend(SEARCH, "tensorrt").quantize_outputs == "never"
    assert for_backend(replace(SEARCH, quantize_outputs="never"), "onnx").quantize_outputs == "never"


def _fused_ops(path: str, tmp_path) -> set[str]:
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    return {n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node}


def test_output_qdq_is_what_onnxruntime_fuses_into_int8_kernels(mbf_model, full, cache, tmp_path):
    """Without Q/DQ on a layer's output ONNX Runtime runs it in fp32 on dequantised values;
    with it the layer becomes a QLinearConv (int8 kernels)."""
    fused = convert_model(mbf_model, "int8", cache_dir=cache,
                          quantization=replace(FULL, quantize_outputs="always"))
    assert fused.path != full.path
    assert "QLinearConv" in _fused_ops(fused.path, tmp_path)
    assert "QLinearConv" not in _fused_ops(full.path, tmp_path)
    graph = onnx.load(fused.path).graph
    readers: dict[str, list[str]] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node.op_type)
    quantized = set(weighted_layers(onnx.load(fused.path)))
    for node in graph.node:
        if node.name in quantized:  # the output Q is the layer's only reader: fusable
            assert readers.get(node.output[0]) == ["QuantizeLinear"], node.name


# The same goal on synthetic:iresnet50 is a measurement, not a test: its search takes 5-15
# minutes on 2 cores, past the suite's budget. Reproduce it with
#   arcface models convert synthetic:iresnet50 --precision int8   (prints the recipe and drift)
# (figures in the README's int8 section).


@pytest.mark.parametrize("first_passing", [0, 1, 7, 19, 20])
def test_bisection_finds_the_fewest_layers_that_pass_and_measures_few(first_passing):
    from engines.models.int8_search import _bisect

    asked: list[int] = []

    def passes(k: int) -> bool:
        asked.append(k)
        return k >= first_passing

    assert _bisect(passes, 20) == first_passing
    assert 20 not in asked and len(asked) <= 6  # the all-fp32 end is the source: never measured
