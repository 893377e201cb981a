"""Preprocessing in the graph: uint8 BGR crops in, the same embeddings out, the same contract."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from engines import eval_faces, get_engine
from engines.base.preprocess import NCHW_FLOAT, NHWC_UINT8
from engines.models.precision import convert_model
from engines.models.preprocess_graph import UINT8_INPUT_NAME, with_uint8_input
from engines.models.resolve import resolve_model

PARITY = 0.99999  # the bound: the uint8 graph is the same model


@pytest.fixture(scope="module")
def u8_mbf(mbf_model, tmp_path_factory):
    return with_uint8_input(mbf_model, str(tmp_path_factory.mktemp("cache")))


def test_the_graph_takes_uint8_nhwc_crops_and_keeps_the_models_output(u8_mbf, mbf_model):
    graph = onnx.load(u8_mbf.path).graph
    (inp,) = graph.input
    assert inp.name == UINT8_INPUT_NAME and inp.type.tensor_type.elem_type == onnx.TensorProto.UINT8
    assert [d.dim_value for d in inp.type.tensor_type.shape.dim][1:] == [112, 112, 3]
    assert [n.op_type for n in graph.node[:5]] == ["Cast", "Transpose", "Gather", "Sub", "Mul"]
    assert graph.output[0].name == onnx.load(mbf_model.path).graph.output[0].name
    assert u8_mbf.input_layout == NHWC_UINT8 and mbf_model.input_layout == NCHW_FLOAT


def test_same_weights_same_contract_other_file(u8_mbf, mbf_model):
    assert u8_mbf.sha256 != mbf_model.sha256
    assert u8_mbf.contract_sha256 == mbf_model.contract_sha256
    again = resolve_model(u8_mbf.path)  # read back from the file's own metadata
    assert again.input_layout == NHWC_UINT8 and again.contract_sha256 == mbf_model.contract_sha256
    assert again.normalization == mbf_model.normalization


@pytest.mark.parametrize("backend", ["onnx", "openvino"])
def test_uint8_graph_matches_the_float_path(backend, mbf_model):
    faces = eval_faces(32)
    host = get_engine(backend, mbf_model, precision="fp32", config=_with_preprocess("host"))
    graph = get_engine(backend, mbf_model, precision="fp32", config=_with_preprocess("graph"))
    assert host.info.input_layout == NCHW_FLOAT and graph.info.input_layout == NHWC_UINT8
    assert host.info.contract == graph.info.contract
    cos = (host.encode(faces) * graph.encode(faces)).sum(1)
    assert cos.min() >= PARITY, cos.min()


def test_converted_graphs_get_the_preprocessing_in_front_too(mbf_model, tmp_path):
    fp16 = convert_model(mbf_model, "fp16", cache_dir=str(tmp_path))
    u8 = with_uint8_input(fp16, str(tmp_path))
    assert u8.precision == "fp16" and u8.input_layout == NHWC_UINT8
    assert u8.contract_sha256 == mbf_model.contract_sha256
    assert onnx.load(u8.path).graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.UINT8


def test_an_mxnet_style_model_keeps_its_own_scaling(tmp_path):
    """A graph that normalises inside (Sub/Mul first, mean 0 / std 1 outside) gets a front that
    only casts, swaps and transposes: the scaling the model expects, read as resolve detects it."""
    from engines.base.preprocess import MXNET_IN_GRAPH

    path = _mxnet_style_graph(tmp_path)
    model = resolve_model(str(path))
    assert model.normalization == MXNET_IN_GRAPH
    u8 = with_uint8_input(model, str(tmp_path))
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in onnx.load(u8.path).graph.initializer}
    assert float(inits["arcface_ray_pre_mean"]) == 0.0 and float(inits["arcface_ray_pre_scale"]) == 1.0
    assert resolve_model(u8.path).normalization == MXNET_IN_GRAPH
    faces = eval_faces(8)
    host = get_engine("onnx", model, config=_with_preprocess("host")).encode(faces)
    inside = get_engine("onnx", model, config=_with_preprocess("graph")).encode(faces)
    assert (host * inside).sum(1).min() >= PARITY


def test_host_preprocessing_and_the_reference_keep_the_float_input(mbf_model):
    assert get_engine("onnx", mbf_model, config=_with_preprocess("host")).info.input_layout == NCHW_FLOAT
    # the reference runs insightface's own preprocessing, whatever the setting says
    reference = get_engine("insightface", mbf_model, config=_with_preprocess("graph"))
    assert reference.info.input_layout == NCHW_FLOAT


def test_float_crops_are_rounded_to_the_uint8_the_graph_takes(mbf_model):
    engine = get_engine("onnx", mbf_model, config=_with_preprocess("graph"))
    faces = eval_faces(4)
    np.testing.assert_array_equal(engine.encode(faces.astype(np.float32)), engine.encode(faces))


def _with_preprocess(mode: str):
    from dataclasses import replace

    from engines import load_config

    cfg = load_config()
    return replace(cfg, embedding=replace(cfg.embedding, preprocess=mode))


def _mxnet_style_graph(tmp_path):
    """A small MXNet-export-like graph: Sub 127.5 and Mul 1/128 as its first nodes."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((512, 3 * 7 * 7)).astype(np.float32) * 0.1, "fc_w")
    nodes = [
        helper.make_node("Sub", ["data", "mean"], ["sub"], name="_minusscalar0"),
        helper.make_node("Mul", ["sub", "scale"], ["mul"], name="_mulscalar0"),
        helper.make_node("AveragePool", ["mul"], ["pool"], kernel_shape=[16, 16], strides=[16, 16],
                         name="pool"),
        helper.make_node("Flatten", ["pool"], ["flat"], axis=1, name="flat"),
        helper.make_node("Gemm", ["flat", "fc_w"], ["fc1"], transB=1, name="fc"),
    ]
    graph = helper.make_graph(
        nodes, "mxnet_like",
        [helper.make_tensor_value_info("data", TensorProto.FLOAT, ["N", 3, 112, 112])],
        [helper.make_tensor_value_info("fc1", TensorProto.FLOAT, ["N", 512])],
        initializer=[numpy_helper.from_array(np.float32(127.5), "mean"),
                     numpy_helper.from_array(np.float32(1 / 128), "scale"), w],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    path = tmp_path / "mxnet_like.onnx"
    onnx.save(model, str(path))
    return path
