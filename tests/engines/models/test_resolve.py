from __future__ import annotations

import logging
import shutil

import onnx
import pytest
from onnx import TensorProto, helper

from engines.base.preprocess import MXNET_IN_GRAPH
from engines.errors import ModelResolutionError
from engines.models import resolve_model


def test_synthetic_reference_resolves_to_cached_file(mbf_model, tmp_path):
    again = resolve_model("synthetic:mobilefacenet")
    assert again.path == mbf_model.path and again.sha256 == mbf_model.sha256
    assert mbf_model.synthetic and mbf_model.model_id == "synthetic-mobilefacenet"
    assert mbf_model.source == "synthetic"


def test_synthetic_seed_and_cache_dir(tmp_path):
    model = resolve_model("synthetic:mobilefacenet@3", cache_dir=str(tmp_path))
    assert model.path.startswith(str(tmp_path))
    assert model.model_id == "synthetic-mobilefacenet-s3"


@pytest.mark.parametrize(
    ("ref", "message"),
    [
        ("synthetic:resnet18", "iresnet50"),
        ("synthetic:iresnet50@x", "integer"),
        ("/no/such/model.onnx", "not a file"),
        ("", "non-empty"),
        ("s3://bucket-only", "bucket and a key"),
    ],
)
def test_bad_references_say_what_is_wrong(ref, message):
    with pytest.raises(ModelResolutionError, match=message):
        resolve_model(ref)


def test_local_path(mbf_model, tmp_path):
    copy = tmp_path / "w600k_mbf.onnx"
    shutil.copy(mbf_model.path, copy)
    local = resolve_model(str(copy))
    assert local.source == "local" and local.model_id == "w600k_mbf"
    assert local.sha256 == mbf_model.sha256
    assert local.synthetic  # the graph's own metadata says so, whatever the file name


def test_insightface_pack_name(monkeypatch, tmp_path, mbf_model, caplog):
    monkeypatch.setenv("INSIGHTFACE_HOME", str(tmp_path))
    with pytest.raises(ModelResolutionError, match=r"buffalo_l.*w600k_r50\.onnx"):
        resolve_model("buffalo_l")
    pack = tmp_path / "models" / "buffalo_sc"
    pack.mkdir(parents=True)
    shutil.copy(mbf_model.path, pack / "w600k_mbf.onnx")
    with caplog.at_level(logging.WARNING):
        model = resolve_model("buffalo_sc")
    assert model.source == "insightface" and model.model_id == "buffalo_sc/w600k_mbf"
    assert "published" in caplog.text  # not the released file: the sha256 check says so


def test_mxnet_style_graph_is_detected(tmp_path):
    nodes = [
        helper.make_node("Sub", ["x", "m"], ["a"], name="_minusscalar0"),
        helper.make_node("Mul", ["a", "s"], ["y"], name="_mulscalar0"),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 112, 112])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 3, 112, 112])],
        initializer=[
            helper.make_tensor("m", TensorProto.FLOAT, [], [127.5]),
            helper.make_tensor("s", TensorProto.FLOAT, [], [0.0078125]),
        ],
    )
    path = tmp_path / "mx.onnx"
    onnx.save(helper.make_model(graph), str(path))
    assert resolve_model(str(path)).normalization == MXNET_IN_GRAPH


def test_s3_model_is_downloaded_once_through_the_configured_endpoint(mbf_model, s3_endpoint, bucket,
                                                                     tmp_path):
    from engines.s3 import make_client

    client = make_client(s3_endpoint)
    client.upload_file(mbf_model.path, bucket, "models/w600k_mbf.onnx")
    ref = f"s3://{bucket}/models/w600k_mbf.onnx"
    model = resolve_model(ref, cache_dir=str(tmp_path), endpoint_url=s3_endpoint)
    assert (model.source, model.model_id, model.sha256) == ("s3", "w600k_mbf", mbf_model.sha256)
    assert model.path.startswith(str(tmp_path))
    client.delete_object(Bucket=bucket, Key="models/w600k_mbf.onnx")
    again = resolve_model(ref, cache_dir=str(tmp_path), endpoint_url=s3_endpoint)  # from the cache
    assert again.path == model.path and again.sha256 == model.sha256
    with pytest.raises(ModelResolutionError, match="cannot fetch model"):
        resolve_model(f"s3://{bucket}/models/absent.onnx", cache_dir=str(tmp_path), endpoint_url=s3_endpoint)
