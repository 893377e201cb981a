"""Skips shared by the GPU tests: each part they need, by name, so a skip says what is missing."""

from __future__ import annotations

import pytest


def need_cuda_python():
    """The cuda-python runtime module, or a clean skip."""
    try:
        from cuda.bindings import runtime
    except ImportError:
        runtime = pytest.importorskip("cuda.cudart", reason="cuda-python is not installed")
    return runtime


def need_tensorrt():
    return pytest.importorskip("tensorrt", reason="tensorrt is not installed on this GPU host")
