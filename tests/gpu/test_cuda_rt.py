"""cuda-python on a real device, without TensorRT: buffers, streams, device facts, the engine key.

These run wherever there is a CUDA device and cuda-python, so the helper the
TensorRT runner uses is proven even on hosts where TensorRT itself is missing.
"""

from __future__ import annotations

import shutil
import subprocess

import numpy as np
import pytest
from gpu_helpers import need_cuda_python

from engines.tensorrt import cuda as cuda_rt
from engines.tensorrt.plan_key import BuildSettings, detect_build_target, parse_key, plan_key

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module", autouse=True)
def cuda():
    need_cuda_python()
    cuda_rt.set_device(0)


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_pinned_device_round_trip_on_our_own_stream(dtype):
    rng = np.random.default_rng(3)
    data = rng.standard_normal(3 * 112 * 112 * 7).astype(dtype)
    src, dst = cuda_rt.PinnedBuffer(data.size, dtype), cuda_rt.PinnedBuffer(data.size, dtype)
    dev, stream = cuda_rt.DeviceBuffer(src.nbytes), cuda_rt.Stream()
    try:
        src.array[:] = data
        dst.array[:] = 0
        cuda_rt.copy_to_device(dev, src, src.nbytes, stream)
        cuda_rt.copy_to_host(dst, dev, src.nbytes, stream)
        stream.synchronize()
        np.testing.assert_array_equal(dst.array, data)
    finally:
        for resource in (stream, dev, dst, src):
            resource.close()


def test_compute_capability_and_memory_are_consistent():
    facts = cuda_rt.device_facts(0)
    assert cuda_rt.compute_capability(0) == (facts.major, facts.minor)
    assert facts.major >= 5 and facts.name and facts.multiprocessors > 0
    free, total = cuda_rt.mem_get_info()
    assert 0 < free <= total and abs(total - facts.total_memory) <= total * 0.01
    smi = shutil.which("nvidia-smi")
    if smi:
        out = subprocess.run([smi, "--query-gpu=compute_cap", "--format=csv,noheader", "-i", "0"],
                             capture_output=True, text=True)
        if out.returncode == 0 and out.stdout.strip():
            assert out.stdout.strip() == f"{facts.major}.{facts.minor}"


def test_plan_key_on_this_device(mbf_model):
    try:
        import tensorrt

        version = tensorrt.__version__
    except ImportError:
        version = "11.4.0.106"  # the pinned gpu extra: the key this host would look up
    target = detect_build_target(0, trt_version=version)
    facts = cuda_rt.device_facts(0)
    assert target.compute_capability == (facts.major, facts.minor) and target.gpu_name == facts.name
    key = plan_key(mbf_model, BuildSettings(precision="fp32"), target)
    fields = parse_key(key)
    assert fields["sm"] == f"{facts.major}{facts.minor}" and fields["trt"] == version
    print(f"\nengine key on {facts.name}: {key}")


def test_bad_device_index_is_an_engine_error():
    from engines.errors import EngineError

    with pytest.raises(EngineError, match="cudaGetDeviceProperties"):
        cuda_rt.device_facts(999)
