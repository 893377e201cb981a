"""Serialized TensorRT engine -> something that embeds a normalised NCHW batch.

Loading and running only: where the plan bytes come from (cache, S3, build)
is ``plan_cache``'s business. The calls are the ones TensorRT 10.1+ and 11
share (shared/research/tensorrt-api.md §3): named tensors,
``set_input_shape`` / ``set_tensor_address`` / ``execute_async_v3`` on a
non-default stream, ``device_memory_size_v2``.

Buffers (device and pinned host) are allocated once for the profile's max
batch, sized from the engine's own tensor dtypes (an fp16 graph converted with
fp32 I/O still has fp32 I/O; a graph that does not would have fp16 I/O). The
sample dims come from the optimization profile, not ``get_tensor_shape``,
which says -1 for every dim the graph leaves dynamic (the builder pins those
to 3x112x112 in the profile).

A plan that does not deserialise raises ``PlanLoadError`` with what TensorRT
logged and a cause: ``out_of_memory`` and ``driver`` are this host's state (the
plan is fine), anything else means the plan itself cannot load here, which is
what the backend quarantines and rebuilds once.

Threads: one runner = one execution context + one stream + one buffer set,
and it is not re-entrant; ``TensorRTEngine`` serialises calls with a lock.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Sequence
from typing import Any

import numpy as np

from ..errors import EngineBuildError, EngineError, PlanLoadError
from . import cuda as cuda_rt
from .runtime import import_tensorrt, recent_trt_messages, trt_logger

logger = logging.getLogger(__name__)

# What TensorRT says when a deserialise fails because of this host, not the plan.
_HOST_CAUSES = (
    ("out_of_memory", re.compile(r"out of memory|OutOfMemory|cudaErrorMemoryAllocation|"
                                 r"CUDA_ERROR_OUT_OF_MEMORY|allocation failed|failed to allocate", re.I)),
    ("driver", re.compile(r"driver|cudaErrorInsufficientDriver|CUDA initialization failure|"
                          r"no CUDA-capable device|cudaErrorNoDevice", re.I)),
)


def classify_load_failure(messages: Sequence[str]) -> str:
    """Why a plan did not deserialise, from TensorRT's log lines.

    ``out_of_memory`` / ``driver``: the host's state, the plan may be fine (never
    quarantine it for that). ``incompatible``: TensorRT says the plan is for
    another device or version, or is not a plan. ``unknown``: nothing said.
    """
    text = "\n".join(messages)
    for cause, pattern in _HOST_CAUSES:
        if pattern.search(text):
            return cause
    if text.strip():
        return "incompatible"
    return "unknown"


def profile_geometry(engine_shape: Sequence[int], profile: Sequence[Sequence[int]]) -> tuple[
        tuple[int, ...], tuple[int, int, int]]:
    """``(sample_shape, (min, opt, max) batch)`` of an input from its engine shape and profile.

    ``engine_shape`` is ``get_tensor_shape`` (-1 where the graph is dynamic);
    ``profile`` is ``get_tensor_profile_shape(name, 0)``: ``[min, opt, max]``. The
    builder gives min, opt and max the same non-batch dims, so those are the sample
    shape; a dim that still differs across the profile is refused (the buffers
    and the contract are for one face size).
    """
    shape = tuple(int(d) for d in engine_shape)
    if len(shape) < 2:
        raise EngineBuildError(f"engine input shape {shape} has no batch axis")
    if shape[0] != -1 and -1 not in shape[1:]:
        return shape[1:], (shape[0], shape[0], shape[0])
    lo, opt, hi = (tuple(int(d) for d in s) for s in profile)
    if not (lo[1:] == opt[1:] == hi[1:]) or len(lo) != len(shape):
        raise EngineBuildError(
            f"engine input {shape} has profile min {lo} / opt {opt} / max {hi}: the non-batch dims must "
            "be fixed by the profile (one face size)"
        )
    sample = tuple(opt[i + 1] if d == -1 else d for i, d in enumerate(shape[1:]))
    if shape[0] != -1:
        return sample, (shape[0], shape[0], shape[0])
    return sample, (lo[0], opt[0], hi[0])


_DTYPE_WORDS = (("bf16", ("BFLOAT16", "BF16")), ("fp16", ("FP16", "HALF")), ("fp8", ("FP8",)),
                ("fp32", ("FP32", "FLOAT")), ("int8", ("INT8",)), ("int32", ("INT32",)),
                ("int64", ("INT64",)), ("bool", ("BOOL",)))


_DTYPE_KEYS = ("Datatype", "DataType", "Format/Datatype", "Format")


def _dtype_of(fmt: str) -> str:
    upper = fmt.upper()
    for name, words in _DTYPE_WORDS:
        if any(w in upper for w in words):
            return name
    return "other"


def layer_precisions(engine_information: str) -> dict[str, int]:
    """Count of layer *outputs* per data type in the engine inspector's JSON (TensorRT 10 or 11 schema).

    Needs a plan built with ``profiling_verbosity = DETAILED`` (the builder sets it)
    and an inspector with an execution context whose input shapes are set;
    otherwise TensorRT prints layer names only, and this raises ``ValueError``.
    """
    info = json.loads(engine_information)
    layers = info.get("Layers", [])
    counts: dict[str, int] = {}
    for layer in layers:
        if not isinstance(layer, dict):
            raise ValueError("the engine inspector printed layer names only: the plan was not built with "
                             "profiling_verbosity DETAILED")
        for out in layer.get("Outputs", []):
            # TensorRT 10: "Format/Datatype" ("Row major linear FP16 format"); 11 splits it in two
            text = next((str(out[k]) for k in _DTYPE_KEYS if k in out), "")
            kind = _dtype_of(text)
            counts[kind] = counts.get(kind, 0) + 1
    return dict(sorted(counts.items()))


class TrtRunner:
    """One deserialized engine with its context, stream and buffers on one device."""

    def __init__(self, plan: bytes, device_id: int = 0, origin: str = "<bytes>") -> None:
        trt = import_tensorrt()
        self._trt = trt
        self.device_id = device_id
        self._resources: list[Any] = []
        self.context = None
        self.engine = None
        cuda_rt.set_device(device_id)
        self._runtime = trt.Runtime(trt_logger())
        mark = trt_logger().recent.mark()
        engine = self._runtime.deserialize_cuda_engine(plan)
        if engine is None:
            raise self._load_error(origin, recent_trt_messages(mark))
        self.engine = engine
        try:
            self._bind_io()
            self._allocate()
        except BaseException:
            self.close()
            raise

    # -- loading ---------------------------------------------------------------------
    def _load_error(self, origin: str, seen: list[str]) -> PlanLoadError:
        cause = classify_load_failure(seen)
        try:
            facts = cuda_rt.device_facts(self.device_id)
            device = f"{facts.name} ({facts.sm})"
            free, total = cuda_rt.mem_get_info()
            memory = f"{free / 2**20:.0f} of {total / 2**20:.0f} MiB free"
        except EngineError as exc:  # the device itself is in trouble: say so, keep the cause
            device, memory = f"device {self.device_id} ({exc})", "free memory unknown"
        why = {
            "out_of_memory": f"the device is short of memory ({memory}); the plan may be fine",
            "driver": f"the CUDA driver refused ({cuda_rt.driver_report()}); the plan may be fine",
            "incompatible": "TensorRT refused the plan itself (see what it said)",
            "unknown": "TensorRT said nothing; treating the plan as unloadable here",
        }[cause]
        return PlanLoadError(
            f"TensorRT {self._trt.__version__} could not deserialize {origin} on {device}: "
            f"{why}" + (f"; TensorRT said: {' | '.join(seen[-3:])}" if seen else ""),
            cause=cause, seen=seen,
        )

    def _bind_io(self) -> None:
        trt, engine = self._trt, self.engine
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if n not in inputs]
        if len(inputs) != 1 or len(outputs) != 1:
            raise EngineBuildError(f"expected one input and one output tensor, got {inputs} -> {outputs}")
        self.input_name, self.output_name = inputs[0], outputs[0]
        in_shape = tuple(engine.get_tensor_shape(self.input_name))
        profile = [in_shape] * 3
        if -1 in in_shape:
            profile = [tuple(s) for s in engine.get_tensor_profile_shape(self.input_name, 0)]
        self.sample_shape, batches = profile_geometry(in_shape, profile)
        self.min_batch, self.opt_batch, self.max_batch = batches
        self.input_dtype = np.dtype(trt.nptype(engine.get_tensor_dtype(self.input_name)))
        self.output_dtype = np.dtype(trt.nptype(engine.get_tensor_dtype(self.output_name)))
        out_shape = tuple(engine.get_tensor_shape(self.output_name))
        if len(out_shape) != 2 or out_shape[-1] < 1:
            raise EngineBuildError(f"output {self.output_name!r} has shape {out_shape}; expected (N, D)")
        self.embedding_dim = int(out_shape[-1])

    def _allocate(self) -> None:
        sample = int(np.prod(self.sample_shape))
        in_count = self.max_batch * sample
        out_count = self.max_batch * self.embedding_dim
        self._h_in = self._own(cuda_rt.PinnedBuffer(in_count, self.input_dtype))
        self._h_out = self._own(cuda_rt.PinnedBuffer(out_count, self.output_dtype))
        self._d_in = self._own(cuda_rt.DeviceBuffer(self._h_in.nbytes))
        self._d_out = self._own(cuda_rt.DeviceBuffer(self._h_out.nbytes))
        self._stream = self._own(cuda_rt.Stream())
        strategy = self._trt.ExecutionContextAllocationStrategy.STATIC
        self.context = self.engine.create_execution_context(strategy=strategy)
        if self.context is None:
            raise EngineBuildError("create_execution_context returned None (out of device memory?)")
        for name, buf in ((self.input_name, self._d_in), (self.output_name, self._d_out)):
            if not self.context.set_tensor_address(name, buf.ptr):
                raise EngineBuildError(f"set_tensor_address({name!r}) refused the buffer")

    def _own(self, resource: Any) -> Any:
        self._resources.append(resource)
        return resource

    # -- running ---------------------------------------------------------------------
    def run(self, blob: np.ndarray) -> np.ndarray:
        """Raw ``(n, D)`` float32 features for ``(n, *sample_shape)``; n above max is chunked."""
        if tuple(blob.shape[1:]) != self.sample_shape:
            raise ValueError(f"engine input is (N, {self.sample_shape}), got {blob.shape}")
        cuda_rt.set_device(self.device_id)
        n = blob.shape[0]
        if n <= self.max_batch:
            return self._run_chunk(blob)
        step = self.max_batch
        return np.concatenate([self._run_chunk(blob[i : i + step]) for i in range(0, n, step)])

    def _run_chunk(self, chunk: np.ndarray) -> np.ndarray:
        n = chunk.shape[0]
        sample = int(np.prod(self.sample_shape))
        rows = max(n, self.min_batch)  # below the profile's min (or a fixed batch): zero-pad
        if not self.context.set_input_shape(self.input_name, (rows, *self.sample_shape)):
            raise ValueError(
                f"batch {rows} is outside the engine's profile {self.min_batch}..{self.max_batch}"
            )
        self._h_in.array[: n * sample] = chunk.astype(self.input_dtype, copy=False).ravel()
        self._h_in.array[n * sample : rows * sample] = 0
        in_bytes = rows * sample * self.input_dtype.itemsize
        out_bytes = rows * self.embedding_dim * self.output_dtype.itemsize
        cuda_rt.copy_to_device(self._d_in, self._h_in, in_bytes, self._stream)
        if not self.context.execute_async_v3(self._stream.handle):
            raise EngineError("execute_async_v3 failed (see the TensorRT error above)")
        cuda_rt.copy_to_host(self._h_out, self._d_out, out_bytes, self._stream)
        self._stream.synchronize()  # nothing reads the pinned buffer before this returns
        out = self._h_out.array[: n * self.embedding_dim].reshape(n, self.embedding_dim)
        return out.astype(np.float32, copy=True)

    def warm_up(self) -> None:
        """Run once at the opt and the max batch: first-run allocations happen here, not in a request."""
        for batch in sorted({self.opt_batch, self.max_batch}):
            self.run(np.zeros((batch, *self.sample_shape), np.float32))

    # -- reporting and teardown ---------------------------------------------------------
    def memory(self) -> dict[str, int]:
        """Device memory: the engine's activation memory, our buffers, and the device's free/total."""
        engine = self.engine
        if hasattr(engine, "device_memory_size_v2"):  # 10.1+; the v1 property is gone in 11
            activations = int(engine.device_memory_size_v2)
        else:
            activations = int(engine.device_memory_size)
        free, total = cuda_rt.mem_get_info()
        buffers = self._d_in.nbytes + self._d_out.nbytes
        return {"engine_activation_bytes": activations, "io_buffer_bytes": buffers,
                "device_free_bytes": free, "device_total_bytes": total}

    def layer_precisions(self) -> dict[str, int]:
        """Layer outputs per data type (``layer_precisions``), with the opt batch's shapes set.

        What proves an fp16 engine computes in fp16: on TensorRT 10 a missing FP16 flag
        still builds, in fp32, and still passes parity.
        """
        if not self.context.set_input_shape(self.input_name, (self.opt_batch, *self.sample_shape)):
            raise EngineError(f"batch {self.opt_batch} refused by the engine's profile")
        inspector = self.engine.create_engine_inspector()
        inspector.execution_context = self.context
        return layer_precisions(inspector.get_engine_information(self._trt.LayerInformationFormat.JSON))

    def describe(self) -> dict[str, Any]:
        return {
            "input": self.input_name, "output": self.output_name,
            "input_dtype": str(self.input_dtype), "output_dtype": str(self.output_dtype),
            "profile": [self.min_batch, self.opt_batch, self.max_batch],
            "embedding_dim": self.embedding_dim,
        }

    def close(self) -> None:
        """Tear down on this runner's device, in the order CUDA and TensorRT need.

        The device first (the calling thread may have another current device, and is
        given it back at the end); then the stream is synced, so no copy or kernel is in
        flight when the context goes; then the context, our buffers and stream, the
        engine, the runtime.
        """
        previous = None
        try:
            previous = cuda_rt.current_device()
            cuda_rt.set_device(self.device_id)
        except Exception as exc:  # teardown must not mask the error that caused it
            logger.warning("close: cudaSetDevice(%d) failed: %s", self.device_id, exc)
        for resource in self._resources:
            if isinstance(resource, cuda_rt.Stream):
                try:
                    resource.synchronize()
                except Exception as exc:
                    logger.warning("close: stream sync failed: %s", exc)
        self.context = None
        for resource in reversed(self._resources):
            try:
                resource.close()
            except Exception as exc:
                logger.warning("releasing %s failed: %s", type(resource).__name__, exc)
        self._resources.clear()
        self.engine = None
        self._runtime = None
        if previous is not None and previous != self.device_id:
            try:
                cuda_rt.set_device(previous)
            except Exception as exc:
                logger.warning("close: could not make device %d current again: %s", previous, exc)
