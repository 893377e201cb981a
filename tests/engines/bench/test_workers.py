"""``engines.bench``: what the table says, and which memory ``peak_mem_mb`` is."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest

from engines.bench.workers import BenchResult, _DeviceMemory, format_table, run_benchmark

pytestmark = pytest.mark.slow  # every test here spawns a process


def _result(**kw) -> BenchResult:
    fields = dict(backend="onnx", model="synthetic-iresnet50", precision="fp32", batch_size=8,
                  num_faces=32, throughput_fps=100.0, latency_ms_p50=10.0, latency_ms_p99=12.0,
                  peak_mem_mb=512.0, speedup=1.0, synthetic=True, requested_backend="onnx")
    return BenchResult(**{**fields, **kw})


def test_table_names_the_model_and_marks_synthetic_weights():
    table = format_table([_result(), _result(backend="tensorrt", model="buffalo_l/w600k_r50",
                                             synthetic=False, mem_kind="device")])
    header, _, synthetic_row, trained_row, *notes = table.splitlines()
    assert "model" in header.split()
    assert "synthetic-iresnet50 (SYNTHETIC)" in synthetic_row and "rss" in synthetic_row
    assert "buffalo_l/w600k_r50" in trained_row and "SYNTHETIC" not in trained_row
    assert "device" in trained_row
    assert any(n.startswith("SYNTHETIC:") and "not a trained face model" in n for n in notes)
    assert any("rss =" in n and "device =" in n for n in notes)


def test_table_error_rows_still_name_the_model():
    row = format_table([_result(error="BackendUnavailable: no GPU")]).splitlines()[2]
    assert "synthetic-iresnet50 (SYNTHETIC)" in row and "ERROR: BackendUnavailable" in row


def test_device_memory_adds_up_only_the_growth_around_the_workers_own_calls():
    used = iter([1000, 1700, 5000, 5300, 5300, 5200]).__next__  # device-wide "used" samples, MiB
    meter = _DeviceMemory(lambda: used() * 2**20)
    with meter.measure():  # engine start: +700
        pass
    with meter.measure():  # a run: +300 (what another process did in between is not ours)
        pass
    with meter.measure():  # something else freed memory: never negative
        pass
    assert meter.held_mb == 1000


def test_cpu_bench_reports_peak_rss_and_never_loads_cuda():
    code = ("import sys\n"
            "from engines.bench.workers import _device_meter\n"
            "assert _device_meter('cpu') is None\n"
            "print(any(m == 'engines.cuda_rt' or m.startswith('cuda') for m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
    (result,) = run_benchmark(["onnx"], "synthetic:mobilefacenet", batch_size=4, num_faces=8,
                              warmup_batches=1, rounds=1, device="cpu")
    assert result.error is None and result.device == "cpu"
    assert result.mem_kind == "rss" and result.peak_mem_mb > 10 and not math.isnan(result.peak_mem_mb)
    assert result.to_dict()["mem_kind"] == "rss" and "peak_mem_mb" in result.to_dict()


def test_preprocess_modes_run_side_by_side_on_the_probe():
    results = run_benchmark(["onnx"], "synthetic:probe", batch_size=4, num_faces=8, warmup_batches=1,
                            rounds=1, preprocess=["host", "graph"])
    assert [r.input_layout for r in results] == ["nchw_float", "nhwc_uint8_bgr"]
    assert all(r.error is None and r.throughput_fps > 0 and r.probe for r in results)
    table = format_table(results)
    assert "(PROBE)" in table and " u8 " in table and " f32 " in table
