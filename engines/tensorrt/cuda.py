"""Thin, checked wrappers over cuda-python's runtime API (``cuda.bindings.runtime``).

The TensorRT runner, the engine-cache device detection and the GPU tests all
go through this one module, so the error convention is handled once: every
cuda-python call returns a tuple whose first element is a ``cudaError_t``, and
on failure the rest are ``None`` (see shared/research/tensorrt-api.md §4).

Importing this module does nothing; CUDA is initialised only when a function
here is first called, which must happen inside the actor or process that will
use the GPU (a CUDA context does not survive ``fork``).
"""

from __future__ import annotations

import ctypes
import functools
import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import BackendUnavailable, EngineError, missing_extra

logger = logging.getLogger(__name__)

# The GPU stack is CUDA 13 throughout (README "GPU install"); CUDA 13 needs driver R580+.
STACK_CUDA_MAJOR = 13
MIN_DRIVER = "580"


@functools.lru_cache(maxsize=1)
def cudart() -> Any:
    """The runtime module: ``cuda.bindings.runtime``, or ``cuda.cudart`` before 12.6.1.

    cuda-bindings 13 removed the ``cuda.cudart`` trampoline; older cuda-python
    releases only have it.
    """
    try:
        from cuda.bindings import runtime
    except ImportError:
        try:
            from cuda import cudart as runtime  # cuda-python < 12.6.1
        except ImportError:
            raise missing_extra("cuda-python", "gpu", "GPU buffers and device queries") from None
    return runtime


def check(result: Any, what: str) -> Any:
    """Unwrap a cuda-python result tuple: the value(s) on success, ``EngineError`` otherwise."""
    rt = cudart()
    if not isinstance(result, tuple):
        result = (result,)
    err, rest = result[0], result[1:]
    if err != rt.cudaError_t.cudaSuccess:
        name = rt.cudaGetErrorName(err)[1]
        name = name.decode() if isinstance(name, bytes) else str(name)
        cls = BackendUnavailable if name in _NO_DEVICE_ERRORS else EngineError
        message = f"CUDA {what} failed: {name} ({int(err)})"
        if name == "cudaErrorInsufficientDriver":
            message += f"; {driver_report()}"
            logger.warning("%s", message)
        raise cls(message)
    if not rest:
        return None
    return rest[0] if len(rest) == 1 else rest


def cuda_version_text(version: int) -> str:
    """``13000`` -> ``13.0`` (cudaDriverGetVersion / cudaRuntimeGetVersion encoding)."""
    return f"{version // 1000}.{version % 1000 // 10}"


def driver_version() -> int:
    """The newest CUDA the installed driver supports (``cudaDriverGetVersion``); 0: no driver."""
    err, version = cudart().cudaDriverGetVersion()
    return int(version) if err == cudart().cudaError_t.cudaSuccess else 0


def runtime_version() -> int:
    """The CUDA runtime cuda-python was built with (``cudaRuntimeGetVersion``)."""
    err, version = cudart().cudaRuntimeGetVersion()
    return int(version) if err == cudart().cudaError_t.cudaSuccess else 0


def driver_report() -> str:
    """What the driver supports against what this stack needs, for an "insufficient driver" error."""
    driver, runtime = driver_version(), runtime_version()
    have = (f"the NVIDIA driver supports CUDA {cuda_version_text(driver)} (cudaDriverGetVersion {driver})"
            if driver else "no NVIDIA driver is loaded (cudaDriverGetVersion 0)")
    return (f"{have}; cuda-python's runtime is CUDA {cuda_version_text(runtime)}; this stack is CUDA "
            f"{STACK_CUDA_MAJOR} throughout: install NVIDIA driver {MIN_DRIVER} or newer")


# Errors that mean "no usable GPU here": the fallback chain treats them as unavailability.
_NO_DEVICE_ERRORS = frozenset(
    {"cudaErrorNoDevice", "cudaErrorInsufficientDriver", "cudaErrorInvalidDevice",
     "cudaErrorDevicesUnavailable", "cudaErrorInitializationError"}
)

def current_device() -> int:
    """The calling thread's current device, as the CUDA runtime knows it (``cudaGetDevice``)."""
    return int(check(cudart().cudaGetDevice(), "cudaGetDevice"))


def set_device(device_id: int) -> None:
    """Make ``device_id`` current in the calling thread (the current device is per host thread).

    Called every time, with no cache of ours in front: other libraries in the process
    (ONNX Runtime's CUDA EP, PyTorch) switch the device on the same thread without
    telling us, so a remembered "already current" goes stale. Once the device's
    primary context exists, ``cudaSetDevice`` is a thread-local switch, cheap per batch;
    the first call also creates that context, which TensorRT then uses.
    """
    check(cudart().cudaSetDevice(int(device_id)), f"cudaSetDevice({device_id})")


@dataclass(frozen=True)
class DeviceFacts:
    """What goes into an engine key and ``info``: name, compute capability, memory."""

    index: int
    name: str
    major: int
    minor: int
    total_memory: int
    multiprocessors: int

    @property
    def sm(self) -> str:
        return f"sm{self.major}{self.minor}"


def device_facts(device_id: int = 0) -> DeviceFacts:
    """Name and compute capability of ``device_id`` (``cudaGetDeviceProperties``)."""
    rt = cudart()
    props = check(rt.cudaGetDeviceProperties(int(device_id)), f"cudaGetDeviceProperties({device_id})")
    name = props.name
    if isinstance(name, (bytes, bytearray)):
        name = bytes(name).split(b"\0", 1)[0].decode(errors="replace")
    return DeviceFacts(
        index=int(device_id),
        name=str(name).strip(),
        major=int(props.major),
        minor=int(props.minor),
        total_memory=int(props.totalGlobalMem),
        multiprocessors=int(props.multiProcessorCount),
    )


def compute_capability(device_id: int = 0) -> tuple[int, int]:
    """``(major, minor)`` through ``cudaDeviceGetAttribute`` (cheaper than the full properties)."""
    rt = cudart()
    attr = rt.cudaDeviceAttr
    major = check(rt.cudaDeviceGetAttribute(attr.cudaDevAttrComputeCapabilityMajor, int(device_id)),
                  "cudaDeviceGetAttribute(major)")
    minor = check(rt.cudaDeviceGetAttribute(attr.cudaDevAttrComputeCapabilityMinor, int(device_id)),
                  "cudaDeviceGetAttribute(minor)")
    return int(major), int(minor)


def mem_get_info() -> tuple[int, int]:
    """``(free, total)`` bytes on the current device."""
    free, total = check(cudart().cudaMemGetInfo(), "cudaMemGetInfo")
    return int(free), int(total)


class Stream:
    """A non-default stream: TensorRT's ``enqueueV3`` on the default stream adds device syncs."""

    def __init__(self) -> None:
        self.handle = check(cudart().cudaStreamCreate(), "cudaStreamCreate")

    def synchronize(self) -> None:
        check(cudart().cudaStreamSynchronize(self.handle), "cudaStreamSynchronize")

    def close(self) -> None:
        if self.handle is not None:
            check(cudart().cudaStreamDestroy(self.handle), "cudaStreamDestroy")
            self.handle = None


class DeviceBuffer:
    """``nbytes`` of device memory (``cudaMalloc``); ``ptr`` is the int TensorRT wants."""

    def __init__(self, nbytes: int) -> None:
        self.nbytes = int(nbytes)
        self.ptr: int | None = int(check(cudart().cudaMalloc(self.nbytes), f"cudaMalloc({nbytes})"))

    def close(self) -> None:
        if self.ptr is not None:
            check(cudart().cudaFree(self.ptr), "cudaFree")
            self.ptr = None


class PinnedBuffer:
    """Page-locked host memory viewed as a flat numpy array of ``dtype``.

    Pinned memory is what makes ``cudaMemcpyAsync`` truly asynchronous; the
    numpy view aliases it, so nothing may touch it until the stream syncs.
    """

    def __init__(self, count: int, dtype: np.dtype | type) -> None:
        self.dtype = np.dtype(dtype)
        self.nbytes = int(count) * self.dtype.itemsize
        ptr = check(cudart().cudaMallocHost(self.nbytes), f"cudaMallocHost({self.nbytes})")
        self.ptr: int | None = int(ptr)
        raw = ctypes.cast(ctypes.c_void_p(self.ptr), ctypes.POINTER(ctypes.c_ubyte))
        self.array = np.ctypeslib.as_array(raw, (self.nbytes,)).view(self.dtype)

    def close(self) -> None:
        if self.ptr is not None:
            self.array = np.empty(0, self.dtype)
            check(cudart().cudaFreeHost(self.ptr), "cudaFreeHost")
            self.ptr = None


def copy_to_device(dst: DeviceBuffer, src: PinnedBuffer, nbytes: int, stream: Stream) -> None:
    rt = cudart()
    check(rt.cudaMemcpyAsync(dst.ptr, src.ptr, int(nbytes), rt.cudaMemcpyKind.cudaMemcpyHostToDevice,
                             stream.handle), "cudaMemcpyAsync(HtoD)")


def copy_to_host(dst: PinnedBuffer, src: DeviceBuffer, nbytes: int, stream: Stream) -> None:
    rt = cudart()
    check(rt.cudaMemcpyAsync(dst.ptr, src.ptr, int(nbytes), rt.cudaMemcpyKind.cudaMemcpyDeviceToHost,
                             stream.handle), "cudaMemcpyAsync(DtoH)")
