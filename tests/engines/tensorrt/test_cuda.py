"""``engines.tensorrt.cuda`` against the real cuda-python, on a host without a GPU.

cuda-python installs and answers on a CPU: every runtime call returns an error code (35,
``cudaErrorInsufficientDriver``: no driver) instead of crashing. The pinned ``cuda-bindings``
13.4.4 that ``make api-bindings`` puts in ``.venv/cuda-bindings/13`` (off the venv's path, so
the CPU suite stays a CPU install) is imported in a subprocess. Where a driver answers (a GPU
host), the no-driver assertions do not apply and tests/gpu covers the rest.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
CUDA13 = ROOT / ".venv" / "cuda-bindings" / "13"

PROBE = textwrap.dedent("""
    import json, logging, threading
    from cuda.bindings import runtime
    from engines.errors import BackendUnavailable
    from engines.tensorrt import cuda as cuda_rt

    records = []
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("engines.tensorrt.cuda").addHandler(
        type("H", (logging.Handler,), {"emit": lambda self, r: records.append(r.getMessage())})())

    # count the calls that reach the real cuda-python (each still runs and answers)
    calls = []
    real_set = runtime.cudaSetDevice
    runtime.cudaSetDevice = lambda device: (calls.append(device), real_set(device))[1]

    out = {"driver": cuda_rt.driver_version(), "runtime": cuda_rt.runtime_version(), "errors": []}
    def work():
        for _ in range(3):
            try:
                cuda_rt.set_device(0)
            except BackendUnavailable as exc:
                out["errors"].append(str(exc))
        # another library switches the device on this thread, through the same API
        runtime.cudaSetDevice(1)
        try:
            cuda_rt.set_device(0)
        except BackendUnavailable as exc:
            out["errors"].append(str(exc))
    thread = threading.Thread(target=work)
    thread.start()
    thread.join()
    out["calls"] = calls
    out["thread_locals"] = [n for n, v in vars(cuda_rt).items() if isinstance(v, threading.local)]
    out["logged"] = records
    try:
        cuda_rt.DeviceBuffer(16)
    except BackendUnavailable as exc:
        out["malloc"] = str(exc)
    print(json.dumps(out))
""")


@pytest.fixture(scope="module")
def probe() -> dict:
    if not CUDA13.is_dir():
        message = f"{CUDA13} is missing: run `make api-bindings`"
        if os.environ.get("ARCFACE_REQUIRE_API_BINDINGS"):
            pytest.fail(message)
        pytest.skip(message)
    env = {**os.environ, "PYTHONPATH": str(CUDA13)}
    proc = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=120,
                          env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    if result["driver"]:
        pytest.skip(f"a CUDA driver answers here (CUDA {result['driver']}): tests/gpu covers this host")
    return result


def test_every_set_device_reaches_the_runtime_none_is_answered_from_a_cache_of_ours(probe):
    # 3 calls, one by "another library", then ours again: the runtime is asked each time
    assert probe["calls"] == [0, 0, 0, 1, 0]
    assert len(probe["errors"]) == 4
    # nothing per-thread in the module could go stale when another library switches device
    assert probe["thread_locals"] == []


def test_insufficient_driver_names_the_driver_it_found_and_the_one_the_stack_needs(probe):
    error = probe["errors"][0]
    assert "cudaSetDevice(0) failed: cudaErrorInsufficientDriver (35)" in error
    assert "no NVIDIA driver is loaded (cudaDriverGetVersion 0)" in error
    assert "CUDA 13 throughout: install NVIDIA driver 580 or newer" in error
    assert any("cudaErrorInsufficientDriver" in line and "580" in line for line in probe["logged"])
    assert "cudaMalloc(16) failed: cudaErrorInsufficientDriver" in probe["malloc"]


def test_the_runtime_is_cuda_13_like_the_stack(probe):
    assert probe["runtime"] // 1000 == 13
