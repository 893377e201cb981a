from __future__ import annotations

import hashlib

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from engines import get_engine, jittered_faces
from engines.models import count_macs, resolve_model
from engines.models.synthetic import ARCHITECTURES, build_synthetic_onnx, calibration_batch


def _sha(model: onnx.ModelProto) -> str:
    return hashlib.sha256(model.SerializeToString()).hexdigest()


@pytest.mark.slow
def test_same_seed_same_bytes_other_seed_other_bytes():
    a, macs_a, _ = build_synthetic_onnx("mobilefacenet", seed=0)
    b, macs_b, _ = build_synthetic_onnx("mobilefacenet", seed=0)
    c, _, _ = build_synthetic_onnx("mobilefacenet", seed=1)
    assert _sha(a) == _sha(b)
    assert _sha(a) != _sha(c)
    assert macs_a == macs_b


def test_cached_file_sha_matches_a_fresh_build(mbf_model):
    fresh, _, _ = build_synthetic_onnx("mobilefacenet", seed=0)
    assert _sha(fresh) == mbf_model.sha256


@pytest.mark.slow
@pytest.mark.parametrize(
    ("arch", "gmacs"),
    # arcface_torch publishes 6.3 / 12.1 "GFLOPs" (really GMACs) for R50 / R100;
    # w600k_mbf is about 0.45.
    [("iresnet50", 6.309), ("iresnet100", 12.090), ("mobilefacenet", 0.4375)],
)
def test_mac_count_per_face_matches_published_figures(arch, gmacs):
    model = resolve_model(f"synthetic:{arch}")
    assert model.macs_per_face == pytest.approx(gmacs * 1e9, rel=1e-3)
    assert count_macs(onnx.load(model.path)) == model.macs_per_face


def test_architectures_have_the_real_layer_counts():
    assert ARCHITECTURES["iresnet50"]["layers"] == (3, 4, 14, 3)
    assert ARCHITECTURES["iresnet100"]["layers"] == (3, 13, 30, 3)
    assert ARCHITECTURES["mobilefacenet"]["blocks"] == (1, 4, 6, 2)


@pytest.mark.slow
def test_iresnet50_graph_has_arcface_structure(r50_model):
    graph = onnx.load(r50_model.path).graph
    ops = [n.op_type for n in graph.node]
    # stem conv + 24 blocks x (2 convs) + 4 downsample convs
    assert ops.count("Conv") == 1 + 2 * 24 + 4
    assert ops.count("PRelu") == 1 + 24
    assert ops.count("Add") == 24
    assert ops[-3:] == ["Flatten", "Gemm", "BatchNormalization"]
    batch = graph.input[0].type.tensor_type.shape.dim[0]
    assert batch.dim_param and not batch.dim_value  # dynamic batch axis
    props = {p.key: p.value for p in onnx.load(r50_model.path).metadata_props}
    assert props["arcface_ray.synthetic"] == "true"


def test_onnxruntime_reproduces_the_float64_reference_forward():
    model, _, reference = build_synthetic_onnx("mobilefacenet")
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    x = calibration_batch(0).astype(np.float32)
    out = session.run(None, {"input.1": x})[0]
    ref = reference.value
    cos = (out * ref).sum(1) / np.linalg.norm(out, axis=1) / np.linalg.norm(ref, axis=1)
    assert cos.min() > 0.99999


@pytest.mark.slow
def test_embeddings_are_discriminative_on_real_faces(r50_model, face_set):
    session = ort.InferenceSession(r50_model.path, providers=["CPUExecutionProvider"])
    from engines.base.preprocess import l2_normalize, to_blob

    emb, _ = l2_normalize(session.run(None, {"input.1": to_blob(face_set.faces)})[0])
    sims = emb @ emb.T
    np.fill_diagonal(sims, -2)
    top1 = face_set.labels[sims.argmax(1)]
    # random weights, yet most jittered crops find a crop of the same face first
    assert (top1 == face_set.labels).mean() > 0.6


def test_unknown_architecture_is_rejected():
    with pytest.raises(ValueError, match="iresnet50"):
        build_synthetic_onnx("resnet18")


def test_the_probe_is_a_real_graph_that_costs_nothing_and_says_so():
    probe = resolve_model("synthetic:probe")
    assert probe.probe and probe.synthetic and probe.embedding_dim == 512
    assert probe.macs_per_face < 100_000  # about 75k, against 6.3G for IResNet-50
    info = get_engine("onnx", probe).info
    assert info.probe and "PROBE" in info.to_dict()["model_note"]
    assert not get_engine("onnx", resolve_model("synthetic:mobilefacenet")).info.probe
    faces = jittered_faces(8, seed=1).faces
    out = get_engine("onnx", probe).encode(faces)
    assert out.shape == (8, 512) and np.allclose(np.linalg.norm(out, axis=1), 1, atol=1e-5)
    assert np.linalg.matrix_rank(out) == 8  # distinct faces, distinct rows: batching errors still show
    reference = get_engine("insightface", probe).encode(faces)  # the real backends run it, same numbers
    assert (out * reference).sum(1).min() >= 0.99999
