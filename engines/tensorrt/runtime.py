"""What the TensorRT builder and runner share: the lazy import, the version, the logger.

``import tensorrt`` happens only inside these functions, so every module of
``engines`` imports on a CPU-only install; a host without the package gets one
error that names the pip extra.
"""

from __future__ import annotations

import functools
import importlib.util
from typing import Any

from ..errors import missing_extra


def tensorrt_installed() -> bool:
    """Cheap check (no import): is the ``tensorrt`` package on this host?"""
    return importlib.util.find_spec("tensorrt") is not None


def cuda_python_installed() -> bool:
    try:
        return importlib.util.find_spec("cuda.bindings") is not None or (
            importlib.util.find_spec("cuda") is not None
            and importlib.util.find_spec("cuda.cudart") is not None
        )
    except ModuleNotFoundError:
        return False


def import_tensorrt(purpose: str = "the tensorrt backend") -> Any:
    """``import tensorrt`` or ``BackendUnavailable`` naming ``pip install 'arcface-ray[gpu]'``."""
    try:
        import tensorrt
    except ImportError:
        raise missing_extra("tensorrt", "gpu", purpose) from None
    return tensorrt


def trt_version() -> str:
    """The full TensorRT version string (``trt.__version__``, e.g. ``11.4.0.106``)."""
    return str(import_tensorrt().__version__)


def trt_major(trt: Any) -> int:
    return int(str(trt.__version__).split(".")[0])


@functools.lru_cache(maxsize=1)
def trt_logger() -> Any:
    """One process-wide TensorRT logger at WARNING (builder and runtime share it)."""
    trt = import_tensorrt()
    return trt.Logger(trt.Logger.WARNING)
