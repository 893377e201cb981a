"""The tensorrt backend on a real GPU: fp32 / fp16 / int8 engines built by the real builder.

Parity with the CPU onnx backend (fp32 graph) on real jittered faces: min
cosine >= 0.9999 for fp32, >= 0.999 for fp16, reported for int8; batch sizes
give the same rows; the fp16 R50 engine's device memory is reported. Engines
are built once per module into a temporary cache (the real build path:
convert -> key -> build -> local cache).
"""

from __future__ import annotations

import threading
from dataclasses import replace

import numpy as np
import pytest
from gpu_helpers import need_cuda_python, need_tensorrt

from engines import get_engine, load_config
from engines.drift import compare_embeddings
from engines.models.sample_faces import jittered_faces

pytestmark = pytest.mark.gpu

MIN_COSINE = {"fp32": 0.9999, "fp16": 0.999}


@pytest.fixture(scope="module")
def cfg(tmp_path_factory):
    need_tensorrt()
    need_cuda_python()
    base = load_config()
    cache = str(tmp_path_factory.mktemp("trt-cache"))
    storage = replace(base.tensorrt.storage, type="local", cache_dir=cache)
    return replace(base, storage=replace(base.storage, cache_dir=cache),
                   tensorrt=replace(base.tensorrt, storage=storage, opt_batch_size=32, max_batch_size=64),
                   embedding=replace(base.embedding, max_batch_size=64))


@pytest.fixture(scope="module")
def eval_faces():
    return jittered_faces(48, seed=11).faces


@pytest.fixture(scope="module")
def engines_by_key(cfg):
    started = {}
    yield started
    for engine in started.values():
        engine.close()


def trt_engine(engines_by_key, cfg, model, precision):
    key = (model.model_id, precision)
    if key not in engines_by_key:
        engines_by_key[key] = get_engine("tensorrt", model, precision=precision, device="cuda:0", config=cfg)
    return engines_by_key[key]


@pytest.mark.parametrize("arch", ["mobilefacenet", "iresnet50"])
@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
def test_parity_with_cpu_onnx(arch, precision, cfg, engines_by_key, eval_faces, mbf_model, r50_model):
    model = {"mobilefacenet": mbf_model, "iresnet50": r50_model}[arch]
    engine = trt_engine(engines_by_key, cfg, model, precision)
    reference = get_engine("onnx", model, device="cpu", precision="fp32", config=cfg)
    report = compare_embeddings(reference.encode(eval_faces), engine.encode(eval_faces))
    info = engine.info
    assert info.backend == "tensorrt" and info.precision == precision
    assert info.runtime["tensorrt"]["io"]["profile"] == [1, 32, 64]
    print(f"\n{arch} {precision}: min cos {report.min_cosine_sim:.6f} mean {report.mean_cosine_sim:.6f} "
          f"p01 {report.p01_cosine_sim:.6f} flips {report.decision_flip_rate:.3f}")
    if precision in MIN_COSINE:
        assert report.min_cosine_sim >= MIN_COSINE[precision], report.summary()
    else:
        assert report.min_cosine_sim > 0.9, report.summary()  # int8: reported; this only catches garbage


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_batch_sizes_give_the_same_rows(precision, cfg, engines_by_key, eval_faces, mbf_model):
    engine = trt_engine(engines_by_key, cfg, mbf_model, precision)
    faces = np.concatenate([eval_faces, eval_faces, eval_faces])[:130]  # > max batch: chunked
    whole = engine.encode(faces)
    for batch in (1, 7, 32, 64):
        parts = np.concatenate([engine.encode(faces[i : i + batch]) for i in range(0, len(faces), batch)])
        cos = np.sum(parts * whole, axis=1)
        assert cos.min() >= 0.9999, (batch, cos.min())


def test_fp16_r50_reports_device_memory(cfg, engines_by_key, r50_model):
    engine = trt_engine(engines_by_key, cfg, r50_model, "fp16")
    memory = engine.info.runtime["tensorrt"]["memory"]
    assert memory["engine_activation_bytes"] > 0 and memory["io_buffer_bytes"] > 0
    assert 0 < memory["device_free_bytes"] <= memory["device_total_bytes"]
    print(f"\nfp16 iresnet50 engine: activations {memory['engine_activation_bytes'] / 2**20:.1f} MiB, "
          f"I/O buffers {memory['io_buffer_bytes'] / 2**20:.1f} MiB, plan "
          f"{engine.info.runtime['tensorrt']['engine_key']}")


def test_startup_drift_gate_passes_the_fp16_engine(cfg, engines_by_key, mbf_model):
    trt_engine(engines_by_key, cfg, mbf_model, "fp16")  # built (or cached) once
    gated = get_engine("tensorrt", mbf_model, precision="fp16", device="cuda:0", fallback=["onnx"],
                       validate_on_startup=True, config=cfg)
    try:
        attempt = gated.info.fallback["attempts"][0]
        assert gated.name == "tensorrt" and attempt["status"] == "selected", attempt
        assert attempt["drift"]["passed"] and attempt["drift"]["min_cosine_sim"] >= 0.999
    finally:
        gated.close()


def test_threads_share_one_engine_safely(cfg, engines_by_key, eval_faces, mbf_model):
    engine = trt_engine(engines_by_key, cfg, mbf_model, "fp32")
    expected = engine.encode(eval_faces)
    results, errors = [], []

    def work():
        try:
            results.append(engine.encode(eval_faces))
        except Exception as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for rows in results:
        np.testing.assert_allclose(rows, expected, atol=1e-5)


def test_a_foreign_plan_is_refused_with_what_tensorrt_said():
    need_tensorrt()
    need_cuda_python()
    from engines.errors import PlanLoadError
    from engines.tensorrt.runner import TrtRunner

    with pytest.raises(PlanLoadError, match=r"could not deserialize garbage\.plan") as info:
        TrtRunner(b"not a TensorRT plan" * 64, 0, origin="garbage.plan")
    assert info.value.plan_at_fault, (info.value.cause, info.value.seen)
    print(f"\nTensorRT on a foreign plan: cause {info.value.cause}, said {info.value.seen}")


def test_fp16_engine_computes_in_fp16_and_fp32_in_fp32(cfg, engines_by_key, mbf_model):
    """The engine inspector's layer precisions (plans are built with profiling_verbosity DETAILED):
    on TensorRT 10 a missing FP16 flag would still build, in fp32, and still pass parity."""
    fp16 = trt_engine(engines_by_key, cfg, mbf_model, "fp16").layer_precisions()
    fp32 = trt_engine(engines_by_key, cfg, mbf_model, "fp32").layer_precisions()
    print(f"\nlayer output dtypes: fp16 engine {fp16}, fp32 engine {fp32}")
    floats16 = fp16.get("fp16", 0) + fp16.get("bf16", 0)
    assert floats16 >= 0.5 * (floats16 + fp16.get("fp32", 0)), fp16
    assert fp32.get("fp16", 0) == 0 and fp32.get("bf16", 0) == 0 and fp32.get("fp32", 0) > 0, fp32


def test_a_plan_that_does_not_deserialise_is_quarantined_and_rebuilt(cfg, engines_by_key, mbf_model):
    """The real runtime refusing real bytes: a cached plan overwritten (sidecar updated, so the
    checksum passes) with garbage is quarantined at start-up and rebuilt once."""
    import hashlib
    import json

    engine = trt_engine(engines_by_key, cfg, mbf_model, "fp32")
    entry = engine._entry
    garbage = b"not a plan any more" * 512
    entry.path.write_bytes(garbage)
    side = entry.path.with_name(entry.path.name + ".json")
    side.write_text(json.dumps({**entry.sidecar, "sha256": hashlib.sha256(garbage).hexdigest()}))
    fresh = get_engine("tensorrt", mbf_model, precision="fp32", device="cuda:0", config=cfg)
    try:
        assert fresh.info.runtime["tensorrt"]["engine_source"] == "built"
        quarantine = entry.path.parent / "quarantine"
        assert any(p.name.startswith(entry.key) for p in quarantine.iterdir())
    finally:
        fresh.close()


def test_an_engine_on_the_second_device_closes_cleanly_from_a_thread_on_the_first(cfg, mbf_model, eval_faces):
    from engines.tensorrt import cuda as cuda_rt

    count = int(cuda_rt.check(cuda_rt.cudart().cudaGetDeviceCount(), "cudaGetDeviceCount"))
    if count < 2:
        pytest.skip("needs two CUDA devices")
    engine = get_engine("tensorrt", mbf_model, precision="fp32", device="cuda:1", config=cfg)
    rows = engine.encode(eval_faces[:8])
    cuda_rt.set_device(0)  # what another library on this thread may leave current
    engine.close()  # syncs the stream and frees on device 1, not 0, then gives device 0 back
    assert rows.shape == (8, 512) and cuda_rt.current_device() == 0


def test_the_uint8_input_graph_builds_and_matches_the_float_input_plan(cfg, engines_by_key, eval_faces,
                                                                    mbf_model):
    """Preprocessing in the graph on TensorRT: a uint8 input binding (a quarter of the bytes over
    PCIe), the device does Cast/Transpose/BGR->RGB/mean/std; same vectors as the float-input plan."""
    graph = trt_engine(engines_by_key, cfg, mbf_model, "fp32")  # embedding.preprocess: auto = graph
    host_cfg = replace(cfg, embedding=replace(cfg.embedding, preprocess="host"))
    host = get_engine("tensorrt", mbf_model, precision="fp32", device="cuda:0", config=host_cfg)
    try:
        assert graph.info.input_layout == "nhwc_uint8_bgr" and host.info.input_layout == "nchw_float"
        assert graph.info.runtime["tensorrt"]["io"]["input_dtype"] == "uint8"
        assert graph.info.contract == host.info.contract
        cos = (graph.encode(eval_faces) * host.encode(eval_faces)).sum(1)
        assert cos.min() >= 0.99999, cos.min()
    finally:
        host.close()
