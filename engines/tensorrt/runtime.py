"""What the TensorRT builder and runner share: the lazy import, the version, the logger.

``import tensorrt`` happens only inside these functions, so every module of
``engines`` imports on a CPU-only install; a host without the package gets one
error that names the pip extra.

Also here, because both the builder and the runner need them: which CUDA major
the installed TensorRT was built for (``tensorrt-cu12`` and ``tensorrt-cu13``
share version strings), a logger that routes TensorRT's messages to ``logging``
and remembers the recent errors (so a failed deserialise can say what TensorRT
saw), and the test that tells a TensorRT API mismatch from a bug of ours.
"""

from __future__ import annotations

import collections
import functools
import importlib.metadata as md
import importlib.util
import logging
import re
import threading
import types
from typing import Any

from ..errors import missing_extra

logger = logging.getLogger(__name__)
trt_messages = logging.getLogger("engines.tensorrt.trt")  # TensorRT's own log lines

# tensorrt-cu13, tensorrt_cu13_bindings, tensorrt-cu12-libs, ...: the CUDA major is in the name
_CU_DIST = re.compile(r"^tensorrt[-_]cu(\d+)(?:[-_](?:bindings|libs))?$")
_TRT_MODULES = ("tensorrt", "tensorrt_bindings")


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
        raise missing_extra("tensorrt-cu13", "gpu", purpose) from None
    return tensorrt


def trt_version() -> str:
    """The full TensorRT version string (``trt.__version__``, e.g. ``11.4.0.106``)."""
    return str(import_tensorrt().__version__)


def trt_major(trt: Any) -> int:
    return int(str(trt.__version__).split(".")[0])


def cuda_major_of_distributions(names: list[str]) -> int | None:
    """The CUDA major named by TensorRT distributions (``tensorrt-cu13`` -> 13); None if none
    names one or they disagree (a cu12 and a cu13 build installed side by side)."""
    majors = {int(m.group(1)) for n in names if (m := _CU_DIST.match(n.lower()))}
    return majors.pop() if len(majors) == 1 else None


@functools.lru_cache(maxsize=1)
def tensorrt_cuda_major() -> int | None:
    """CUDA major the installed TensorRT was built for, from its pip distributions' names.

    None where it cannot be told (TensorRT from a tarball or an apt package, or two
    builds installed): plan keys then say ``cuunknown``, which no known build shares.
    """
    names = [str(d.metadata["Name"] or "") for d in md.distributions()]
    major = cuda_major_of_distributions([n for n in names if n.lower().startswith("tensorrt")])
    if major is None and tensorrt_installed():
        logger.warning("cannot tell which CUDA major the installed TensorRT was built for "
                       "(no tensorrt-cuNN distribution, or several): plan keys say cuunknown")
    return major


class _Recent:
    """The last TensorRT errors and warnings, numbered, so a caller can ask "since my call"."""

    def __init__(self, size: int = 64) -> None:
        self._lines: collections.deque[tuple[int, str, str]] = collections.deque(maxlen=size)
        self._count = 0
        self._lock = threading.Lock()

    def add(self, severity: str, message: str) -> None:
        with self._lock:
            self._count += 1
            self._lines.append((self._count, severity, message))

    def mark(self) -> int:
        with self._lock:
            return self._count

    def since(self, mark: int) -> list[str]:
        with self._lock:
            return [f"[{sev}] {msg}" for n, sev, msg in self._lines if n > mark]


_SEVERITY_LEVELS = {"INTERNAL_ERROR": logging.CRITICAL, "ERROR": logging.ERROR, "WARNING": logging.WARNING,
                    "INFO": logging.DEBUG, "VERBOSE": logging.DEBUG}


@functools.lru_cache(maxsize=1)
def trt_logger() -> Any:
    """One process-wide TensorRT logger (builder and runtime share it).

    A ``trt.ILogger`` subclass: TensorRT's messages go to the ``engines.tensorrt.trt``
    logger (INFO and VERBOSE as DEBUG), and errors and warnings are kept in
    ``recent`` so that a refusal (a plan that does not deserialise) can be explained.
    """
    trt = import_tensorrt()

    class TrtLogger(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.recent = _Recent()

        def log(self, severity: Any, msg: str) -> None:
            name = getattr(severity, "name", str(severity))
            level = _SEVERITY_LEVELS.get(name, logging.WARNING)
            if level >= logging.WARNING:
                self.recent.add(name, msg)
            if trt_messages.isEnabledFor(level):
                trt_messages.log(level, "%s", msg)

    return TrtLogger()


def recent_trt_messages(mark: int) -> list[str]:
    """TensorRT errors and warnings logged since ``trt_logger().recent.mark()`` returned ``mark``."""
    return trt_logger().recent.since(mark)


def _from_tensorrt(obj: Any) -> bool:
    if isinstance(obj, types.ModuleType):
        module = obj.__name__
    else:
        module = getattr(obj if isinstance(obj, type) else type(obj), "__module__", "") or ""
    return str(module).split(".")[0] in _TRT_MODULES


def is_api_mismatch(exc: BaseException) -> bool:
    """Is ``exc`` TensorRT's Python API refusing us (a name it lacks, arguments it rejects)?

    An ``AttributeError`` counts only when the object that lacks the attribute is
    TensorRT's (``None.create_execution_context`` is our bug, not an API change);
    a ``TypeError`` only when pybind11 rejected the arguments of a TensorRT call.
    Everything else is left to propagate as what it is.
    """
    if isinstance(exc, AttributeError):
        obj = getattr(exc, "obj", None)
        return obj is not None and _from_tensorrt(obj)
    if isinstance(exc, TypeError):
        text = str(exc)
        rejected = "incompatible function arguments" in text or "incompatible constructor arguments" in text
        return rejected and any(f"{m}." in text for m in _TRT_MODULES)
    return False
