"""``arcface bench`` on a CUDA device reports the GPU memory the engine holds (``mem_kind: device``)."""

from __future__ import annotations

import pytest
from gpu_helpers import need_cuda_python, need_tensorrt

from engines.bench.workers import _DeviceMemory, run_benchmark
from engines.tensorrt import cuda as cuda_rt

pytestmark = pytest.mark.gpu


def test_device_meter_sees_an_allocation_made_inside_it():
    need_cuda_python()
    meter = _DeviceMemory.for_device("cuda:0")
    with meter.measure():
        buffer = cuda_rt.DeviceBuffer(256 << 20)
    try:
        assert meter.held_mb >= 255, meter.held_mb
    finally:
        buffer.close()


@pytest.mark.parametrize("backend", ["tensorrt", "onnx"])
def test_gpu_bench_reports_device_memory(backend):
    need_cuda_python()
    if backend == "tensorrt":
        need_tensorrt()
    (result,) = run_benchmark([backend], "synthetic:mobilefacenet", batch_size=8, num_faces=16,
                              warmup_batches=1, rounds=1, device="cuda:0", timeout_s=540)
    if result.error and backend == "onnx" and "CUDAExecutionProvider" in result.error:
        pytest.skip(f"onnxruntime has no CUDA provider here: {result.error}")
    assert result.error is None, result.error
    assert result.device.startswith("cuda") and result.mem_kind == "device"
    # weights + activations + I/O buffers of even the smallest model: well above a few MB
    assert 1 < result.peak_mem_mb < 0.9 * cuda_rt.device_facts(0).total_memory / 2**20
