"""ONNX Runtime's TensorRT EP fed the converted fp16 graph, caching inside our cache dir."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from engines import get_engine, load_config
from engines.drift import compare_embeddings
from engines.models.sample_faces import jittered_faces

pytestmark = pytest.mark.gpu


def test_trt_ep_fp16_matches_cpu_and_caches_its_engine(mbf_model, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    if "TensorrtExecutionProvider" not in ort.get_available_providers():
        pytest.skip("this onnxruntime build has no TensorRT EP (install onnxruntime-gpu: make install-gpu)")
    base = load_config()
    cfg = replace(base, storage=replace(base.storage, cache_dir=str(tmp_path)),
                  onnx=replace(base.onnx, providers=("TensorrtExecutionProvider", "CPUExecutionProvider")))
    engine = get_engine("onnx", mbf_model, device="cuda:0", precision="fp16", config=cfg)
    active = engine.info.runtime["onnxruntime"]["active_providers"]
    if active[0] != "TensorrtExecutionProvider":
        pytest.skip(f"ORT could not load TensorRT libraries (active: {active})")
    faces = jittered_faces(24, seed=12).faces
    reference = get_engine("onnx", mbf_model, device="cpu", precision="fp32", config=cfg)
    report = compare_embeddings(reference.encode(faces), engine.encode(faces))
    assert report.min_cosine_sim >= 0.999, report.summary()
    cached = list((Path(tmp_path) / "engines" / "ort-trt").glob("*"))
    assert cached, "the TensorRT EP wrote no engine cache under <cache_dir>/engines/ort-trt"
