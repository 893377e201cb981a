"""The machine's own matrix-product peak, measured, so speeds can be read as a fraction of it.

A faces/s figure says little on its own: the same backend is fast on one CPU
and slow on the next. Dividing the FLOP rate a backend reaches by the rate a
large, cache-friendly matrix product reaches on the same cores (in the same
precision) tells how much headroom is left. The peak is measured with the
runtime the fast path uses (OpenVINO's CPU plugin: the oneDNN kernels that run
our convolutions), best of several short timings, all cores on one request.
"""

from __future__ import annotations

import importlib.util
import logging
import time
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

MATMUL_SIZE = 2048  # M = N = K for the numpy fallback


def _best_rate(run, flops: float, seconds: float, repeats: int = 5) -> float:
    """Best FLOP/s over ``repeats`` windows of ``seconds`` each (noise only slows a window)."""
    run()
    best = 0.0
    for _ in range(repeats):
        started, calls = time.perf_counter(), 0
        while time.perf_counter() - started < seconds:
            run()
            calls += 1
        best = max(best, flops * calls / (time.perf_counter() - started))
    return best


def _openvino_kernels(rng: np.random.Generator) -> list[tuple[str, Any, np.ndarray, float]]:
    """(name, model, input, FLOPs per call): two matrix products and a 3x3 convolution with
    IResNet's stage-3 shape (a matrix product in implicit-GEMM form, which oneDNN's
    convolution kernels run faster than its plain GEMM)."""
    import openvino as ov
    import openvino.opset13 as ops

    kernels = []
    for m, k, n in ((1024, 1024, 1024), (256, 2048, 2048)):
        param = ops.parameter([m, k], ov.Type.f32)
        weights = ops.constant(rng.standard_normal((k, n)).astype(np.float32))
        kernels.append((f"matmul {m}x{k}x{n}", ov.Model([ops.matmul(param, weights, False, False)], [param]),
                        rng.standard_normal((m, k)).astype(np.float32), 2.0 * m * k * n))
    batch, channels, side = 16, 256, 14
    param = ops.parameter([batch, channels, side, side], ov.Type.f32)
    weights = ops.constant((rng.standard_normal((channels, channels, 3, 3)) * 0.05).astype(np.float32))
    conv = ops.convolution(param, weights, [1, 1], [1, 1], [1, 1], [1, 1])
    kernels.append((f"conv3x3 {batch}x{channels}x{side}x{side}", ov.Model([conv], [param]),
                    rng.standard_normal((batch, channels, side, side)).astype(np.float32),
                    2.0 * batch * channels * channels * 9 * side * side))
    return kernels


def _openvino_peaks(seconds: float) -> dict[str, Any]:
    """Each kernel once per stream, all streams at once: the way the openvino backend runs
    batches (throughput hint), so the peak and the backend use the cores alike."""
    import openvino as ov

    core = ov.Core()
    capabilities = set(core.get_property("CPU", "OPTIMIZATION_CAPABILITIES"))
    kernels = _openvino_kernels(np.random.default_rng(0))
    peaks: dict[str, Any] = {
        "method": f"openvino {ov.get_version()} CPU, best of {', '.join(k[0] for k in kernels)}; "
                  "one per stream, throughput hint",
        "kernels": {},
    }
    for name, ov_precision, capability in (("fp32", "f32", "FP32"), ("bf16", "bf16", "BF16")):
        if capability not in capabilities:
            peaks[f"{name}_gflops"] = None
            continue
        best = 0.0
        for kernel, model, x, flops in kernels:
            compiled = core.compile_model(
                model, "CPU", {"INFERENCE_PRECISION_HINT": ov_precision, "PERFORMANCE_HINT": "THROUGHPUT"}
            )
            streams = max(1, int(compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS")))
            queue = ov.AsyncInferQueue(compiled, streams)

            def run(queue=queue, streams=streams, x=x) -> None:
                for _ in range(streams):
                    queue.start_async({0: x})
                queue.wait_all()

            rate = _best_rate(run, flops * streams, seconds) / 1e9
            peaks["kernels"][f"{name} {kernel}"] = round(rate, 1)
            best = max(best, rate)
        peaks[f"{name}_gflops"] = best
    return peaks


def _numpy_peaks(size: int, seconds: float) -> dict[str, Any]:
    rng = np.random.default_rng(0)
    a = rng.standard_normal((size, size)).astype(np.float32)
    b = rng.standard_normal((size, size)).astype(np.float32)
    rate = _best_rate(lambda: a @ b, 2.0 * size**3, seconds)
    return {"method": f"numpy {np.__version__} float32 matmul {size}^3", "fp32_gflops": rate / 1e9,
            "bf16_gflops": None}


def _cupy_peaks(size: int, seconds: float) -> dict[str, Any]:
    import cupy as cp

    peaks: dict[str, Any] = {"method": f"cupy {cp.__version__} matmul {size}^3 on cuda:0"}
    for name, dtype in (("fp32", cp.float32), ("fp16", cp.float16), ("bf16", None)):
        if dtype is None:
            peaks[f"{name}_gflops"] = None
            continue
        a = cp.random.standard_normal((size, size), dtype=cp.float32).astype(dtype)
        b = cp.random.standard_normal((size, size), dtype=cp.float32).astype(dtype)

        def run(a=a, b=b) -> None:
            a @ b
            cp.cuda.Device().synchronize()

        peaks[f"{name}_gflops"] = _best_rate(run, 2.0 * size**3, seconds) / 1e9
    return peaks


def measure_peaks(device: str = "cpu", seconds: float = 0.4, size: int = MATMUL_SIZE) -> dict[str, Any]:
    """``{"method", "fp32_gflops", "bf16_gflops"[, "fp16_gflops", "kernels"]}``; ``None`` where the
    hardware has no native unit for that precision."""
    try:
        if device.startswith("cuda") and importlib.util.find_spec("cupy") is not None:
            return _cupy_peaks(max(size, 4096), seconds)
        if importlib.util.find_spec("openvino") is not None:
            return _openvino_peaks(seconds)
    except Exception as exc:  # a peak is context for the report, never a reason to fail it
        logger.warning("matrix-product peak with the native runtime failed (%s); using numpy", exc)
    return _numpy_peaks(size, seconds)
