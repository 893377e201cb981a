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
        cuda_major = None  # detected from the installed tensorrt-cuNN distribution
    except ImportError:
        version, cuda_major = "11.4.0.106", 13  # the pinned gpu extra: the key this host would look up
    target = detect_build_target(0, trt_version=version, trt_cuda_major=cuda_major)
    facts = cuda_rt.device_facts(0)
    assert target.compute_capability == (facts.major, facts.minor) and target.gpu_name == facts.name
    key = plan_key(mbf_model, BuildSettings(precision="fp32"), target)
    fields = parse_key(key)
    assert fields["sm"] == f"{facts.major}{facts.minor}" and fields["trt"] == version
    assert fields["device"] == target.device_tag[1:] and fields["cuda"] == str(target.trt_cuda_major)
    print(f"\nengine key on {facts.name}: {key}")


def test_driver_and_runtime_are_the_cuda_13_stack():
    driver, runtime = cuda_rt.driver_version(), cuda_rt.runtime_version()
    print(f"\nCUDA driver supports {cuda_rt.cuda_version_text(driver)}, cuda-python runtime "
          f"{cuda_rt.cuda_version_text(runtime)}")
    assert driver >= runtime // 1000 * 1000 and runtime // 1000 == cuda_rt.STACK_CUDA_MAJOR


def _device_count() -> int:
    return int(cuda_rt.check(cuda_rt.cudart().cudaGetDeviceCount(), "cudaGetDeviceCount"))


def test_set_device_is_right_after_another_library_switched_the_device():
    if _device_count() < 2:
        pytest.skip("needs two CUDA devices")
    rt = cuda_rt.cudart()
    cuda_rt.set_device(0)
    cuda_rt.check(rt.cudaSetDevice(1), "cudaSetDevice(1)")  # as ONNX Runtime's CUDA EP does on this thread
    cuda_rt.set_device(0)
    assert cuda_rt.current_device() == 0


def test_bad_device_index_is_an_engine_error():
    from engines.errors import EngineError

    with pytest.raises(EngineError, match="cudaGetDeviceProperties"):
        cuda_rt.device_facts(999)
