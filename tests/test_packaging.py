"""The GPU install targets in the Makefile pin what pyproject.toml pins (they cannot read it)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _pins() -> dict[str, str]:
    """Every ``"name==version"`` requirement in pyproject.toml (tomllib is 3.11+; we support 3.10)."""
    text = (ROOT / "pyproject.toml").read_text()
    return dict(re.findall(r'^\s*"([A-Za-z0-9_.\-]+)(?:\[[^\]]*\])?==([^";\s]+)"', text, re.M))


def test_makefile_gpu_pins_match_pyproject():
    makefile = (ROOT / "Makefile").read_text()
    variables = dict(re.findall(r"^([A-Z0-9_]+_VERSION) := (\S+)$", makefile, re.M))
    pins = _pins()
    assert variables["ORT_GPU_VERSION"] == pins["onnxruntime-gpu"]
    # the conformance test reads the bindings of the TensorRT and cuda-python the gpu extra installs
    assert variables["TRT11_BINDINGS_VERSION"] == pins["tensorrt-cu13"]
    assert variables["CUDA13_BINDINGS_VERSION"] == pins["cuda-python"]
    assert variables["TRT10_BINDINGS_VERSION"].startswith("10.")
    assert variables["CUDA12_BINDINGS_VERSION"].startswith("12.")
    # the GPU build of ONNX Runtime replaces the CPU one of the same version
    assert pins["onnxruntime-gpu"] == pins["onnxruntime"]


def test_the_gpu_stack_is_cuda_13_throughout():
    """One stack (README "GPU install"): TensorRT, cuda-python and the CUDA EP's libraries all CUDA 13."""
    pins = _pins()
    assert pins["cuda-python"].startswith("13.") and "tensorrt" not in pins and "tensorrt-cu12" not in pins
    assert pins["nvidia-cuda-runtime"].startswith("13.") and pins["nvidia-cublas"].startswith("13.")
    assert "nvidia-cudnn-cu13" in pins and pins["nvidia-curand"].startswith("10.")
