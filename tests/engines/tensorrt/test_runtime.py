"""Which CUDA major the installed TensorRT was built for, read from its distributions' names."""

from __future__ import annotations

from engines.tensorrt.runtime import cuda_major_of_distributions, tensorrt_cuda_major, tensorrt_installed


def test_the_cuda_major_comes_from_the_tensorrt_distribution_names():
    cu13 = ["tensorrt-cu13", "tensorrt_cu13_libs", "tensorrt_cu13_bindings"]
    assert cuda_major_of_distributions(cu13) == 13
    assert cuda_major_of_distributions(["tensorrt-cu12-bindings"]) == 12
    # an apt or tarball TensorRT names no CUDA; two builds side by side cannot be told apart
    assert cuda_major_of_distributions(["tensorrt"]) is None
    assert cuda_major_of_distributions(["tensorrt-cu12", "tensorrt-cu13"]) is None
    assert cuda_major_of_distributions(["tensorrt-cuda-helpers"]) is None


def test_a_host_without_tensorrt_has_no_tensorrt_cuda_major():
    if not tensorrt_installed():
        assert tensorrt_cuda_major() is None
