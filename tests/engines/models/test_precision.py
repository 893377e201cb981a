"""fp16 / int8 ONNX graph transforms, checked on CPU with ONNX Runtime."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto

from engines import get_engine, resolve_model
from engines.config.schema import QuantizationConfig
from engines.hardware import cpu_has_int8_dot
from engines.models import int8_recipe
from engines.models.precision import conversion_recipe, convert_model, converted_path

# full int8 (every weighted layer), both Q/DQ placements: the checks on the graph's form hold for each
FULL = QuantizationConfig(calibration_faces=32, keep_fp32="none")
FORMS = {"fp16": None, "int8": FULL, "int8-fused": QuantizationConfig(calibration_faces=32, keep_fp32="none",
                                                                       quantize_outputs="always")}


@pytest.fixture(scope="module", params=list(FORMS))
def form(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def converted(form, mbf_model):
    return convert_model(mbf_model, form.split("-")[0], quantization=FORMS[form])


def test_converted_graph_keeps_fp32_io_and_loads_in_onnxruntime(converted):
    graph = onnx.load(converted.path).graph
    assert graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT
    assert graph.output[0].type.tensor_type.elem_type == TensorProto.FLOAT
    session = ort.InferenceSession(converted.path, providers=["CPUExecutionProvider"])
    out = session.run(None, {session.get_inputs()[0].name: np.zeros((2, 3, 112, 112), np.float32)})
    assert out[0].shape == (2, 512) and out[0].dtype == np.float32


def test_converted_graph_has_the_expected_nodes(converted):
    graph = onnx.load(converted.path).graph
    ops = {n.op_type for n in graph.node}
    if converted.precision == "fp16":
        inits = [i for i in graph.initializer if i.data_type == TensorProto.FLOAT16]
        assert inits and "Cast" in ops
    else:
        assert {"QuantizeLinear", "DequantizeLinear"} <= ops
        zero_points = [i for i in graph.initializer if i.name.endswith("_zero_point")]
        assert zero_points and all(
            not onnx.numpy_helper.to_array(z).any() for z in zero_points
        )  # symmetric: TensorRT's explicit quantisation needs zero points of 0


def test_int8_graph_dequantizes_only_what_tensorrt_can(converted):
    """TensorRT's DequantizeLinear takes int8 / fp8 / int4 / fp4: an int32 bias behind one never
    builds (ONNX Runtime's CPU provider runs it, so only the graph itself can show this)."""
    if converted.precision != "int8":
        pytest.skip("int8 only")
    graph = onnx.load(converted.path).graph
    initializer_types = {i.name: i.data_type for i in graph.initializer}
    q_outputs = {n.output[0] for n in graph.node if n.op_type == "QuantizeLinear"}
    dq_inputs = [n.input[0] for n in graph.node if n.op_type == "DequantizeLinear"]
    assert dq_inputs
    for name in dq_inputs:
        assert name in q_outputs or initializer_types.get(name) == TensorProto.INT8, name
    zero_points = [i for i in graph.initializer if i.name.endswith("_zero_point")]
    assert {z.data_type for z in zero_points} == {TensorProto.INT8}  # so every QuantizeLinear is int8 too
    # biases stay float; BatchNormalization's parameters are constants, not dequantized tensors
    dq_outputs = {n.output[0] for n in graph.node if n.op_type == "DequantizeLinear"}
    for node in graph.node:
        if node.op_type in ("Conv", "Gemm") and len(node.input) > 2:
            assert initializer_types.get(node.input[2]) == TensorProto.FLOAT, node.name
        if node.op_type == "BatchNormalization":
            assert not set(node.input[1:]) & dq_outputs, node.name


def test_every_option_that_changes_the_graph_changes_the_file_name(mbf_model, monkeypatch):
    def path(q: QuantizationConfig = FULL, keep: tuple[str, ...] = ()) -> str:
        return str(converted_path(mbf_model, "int8", None, conversion_recipe("int8", q, keep)))

    base = path()
    assert path(replace(FULL, calibration_faces=64)) != base
    assert path(replace(FULL, calibration_method="entropy")) != base
    assert path(replace(FULL, calibration_percentile=99.99)) != base
    assert path(replace(FULL, quantize_outputs="always")) != base
    assert path(keep=("Conv_2",)) != base
    assert str(converted_path(mbf_model, "fp16", None)) != base
    changes = [
        ("INT8_EXTRA_OPTIONS", {**int8_recipe.INT8_EXTRA_OPTIONS, "QuantizeBias": True}),
        ("WEIGHTED_OPS", (*int8_recipe.WEIGHTED_OPS, "BatchNormalization")),
        ("CALIBRATION_SEED", int8_recipe.CALIBRATION_SEED + 1),
        ("version", lambda dist: "0.0-another-quantiser"),
    ]
    for name, value in changes:
        with monkeypatch.context() as m:
            m.setattr(int8_recipe, name, value)
            assert path() != base, name
    assert path() == base


def test_the_quantiser_is_called_with_the_recipe_and_nothing_else(mbf_model, tmp_path, monkeypatch):
    """Every graph-changing argument of quantize_static comes from the recipe that names the file."""
    import onnxruntime.quantization as q

    seen = {}
    real = q.quantize_static

    def recording(model_input, model_output, reader, **kwargs):
        seen.update(kwargs)
        return real(model_input, model_output, reader, **kwargs)

    monkeypatch.setattr(q, "quantize_static", recording)
    settings = replace(FULL, calibration_faces=16)
    graph = convert_model(mbf_model, "int8", cache_dir=str(tmp_path), quantization=settings)
    recipe = conversion_recipe("int8", settings)
    assert seen["extra_options"] == recipe["extra_options"] and seen["extra_options"]["QuantizeBias"] is False
    assert seen["op_types_to_quantize"] == recipe["op_types_to_quantize"]
    assert "BatchNormalization" not in seen["op_types_to_quantize"]
    assert seen["per_channel"] is recipe["per_channel"]
    assert {k: str(v).rsplit(".", 1)[-1] for k, v in seen.items()
            if k in ("quant_format", "activation_type", "weight_type", "calibrate_method")} == {
        k: recipe[k] for k in ("quant_format", "activation_type", "weight_type", "calibrate_method")}
    assert set(seen) == {"quant_format", "activation_type", "weight_type", "per_channel", "calibrate_method",
                         "op_types_to_quantize", "extra_options", "calibration_cache_path"}
    props = {p.key: p.value for p in onnx.load(graph.path, load_external_data=False).metadata_props}
    assert json.loads(props["arcface_ray.recipe"]) == recipe


def test_converted_model_has_own_sha_and_the_source_contract(converted, mbf_model):
    assert converted.sha256 != mbf_model.sha256
    assert converted.derived_from_sha256 == mbf_model.sha256
    again = resolve_model(converted.path)  # the file itself records where it came from
    assert again.precision == converted.precision
    assert again.contract_sha256 == mbf_model.sha256
    assert again.synthetic


def test_conversion_is_cached(converted, form, mbf_model):
    again = convert_model(mbf_model, converted.precision, quantization=FORMS[form])
    assert again.path == converted.path and again.sha256 == converted.sha256


def test_onnx_backend_runs_converted_precisions_in_the_same_contract(mbf_model, faces):
    fp32 = get_engine("onnx", mbf_model)
    fp16 = get_engine("onnx", mbf_model, precision="fp16")
    assert fp16.info.precision == "fp16"
    assert fp16.info.contract == fp32.info.contract
    cos = (fp32.encode(faces) * fp16.encode(faces)).sum(1)
    assert cos.min() >= 0.999


def test_cannot_convert_to_unknown_or_from_reduced_precision(mbf_model, converted):
    with pytest.raises(ValueError, match="cannot convert"):
        convert_model(mbf_model, "fp8")
    other = "int8" if converted.precision == "fp16" else "fp16"
    with pytest.raises(ValueError, match="fp32 model"):
        convert_model(converted, other)


def _compare(precision: str, **env: str) -> dict:
    proc = subprocess.run(
        [sys.executable, "-m", "engines", "compare", "--backend-a", "onnx", "--backend-b", "onnx",
         "--precision-a", "fp32", "--precision-b", precision, "--model", "synthetic:iresnet50",
         "--n-samples", "48", "--json"],
        capture_output=True, text=True, timeout=900, env={**os.environ, **env},
    )
    assert proc.returncode in (0, 1), proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_fp16_iresnet50_drift_passes_the_gate():
    out = _compare("fp16")
    assert out["b"]["precision"] == "fp16"
    assert out["min_cosine_sim"] >= 0.999 and out["passed"]


@pytest.mark.slow
def test_full_int8_iresnet50_drift_is_reported():
    out = _compare("int8", ARCFACE_QUANTIZATION__KEEP_FP32="none")
    assert out["b"]["precision"] == "int8"
    # reported, not gated here: a 50-layer network in full int8 drifts more than
    # the 0.001 bound allows (see README "Performance")
    assert -1.0 <= out["min_cosine_sim"] <= out["mean_cosine_sim"] <= 1.0
    assert out["passed"] == (out["min_cosine_sim"] >= 0.999)
    if cpu_has_int8_dot():
        # With VNNI / AMX the int8 products are exact and the drift is the quantisation's
        # own (min cosine 0.986 on Zen 4). Without them ONNX Runtime's AVX2 kernels sum
        # u8 x s8 pairs in saturating int16 (vpmaddubsw): 0.80 on Zen 3, so no bound there.
        assert out["min_cosine_sim"] > 0.9


@pytest.mark.slow
def test_models_convert_reports_the_graphs_drift_against_fp32(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "engines", "models", "convert", "synthetic:mobilefacenet",
         "--precision", "fp16", "--json"],
        capture_output=True, text=True, timeout=600,
        env={**os.environ, "ARCFACE_CACHE_DIR": str(tmp_path)},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    drift = out["drift_vs_fp32"]
    assert out["precision"] == "fp16" and drift["graph_sha256"] == out["sha256"]
    assert drift["passed"] and drift["min_cosine_sim"] >= 0.999 and drift["n"] == 32
    assert list((tmp_path / "models" / "converted").glob("*fp16-r*.drift-*.json"))  # cached for the build
