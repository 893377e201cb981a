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
    variables = dict(re.findall(r"^([A-Z_]+_VERSION) := (\S+)$", makefile, re.M))
    pins = _pins()
    assert variables == {
        "ORT_GPU_VERSION": pins["onnxruntime-gpu"],
        "CUDA_PYTHON_VERSION": pins["cuda-python"],
    }
    # the GPU build of ONNX Runtime replaces the CPU one of the same version
    assert pins["onnxruntime-gpu"] == pins["onnxruntime"]
