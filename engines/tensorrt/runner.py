"""Serialized TensorRT engine -> something that embeds a normalised NCHW batch.

Loading and running only: where the plan bytes come from (cache, S3, build)
is ``plan_cache``'s business. The calls are the ones TensorRT 10.1+ and 11
share (shared/research/tensorrt-api.md §3): named tensors,
``set_input_shape`` / ``set_tensor_address`` / ``execute_async_v3`` on a
non-default stream, ``device_memory_size_v2``.

Buffers (device and pinned host) are allocated once for the profile's max
batch, sized from the engine's own tensor dtypes (an fp16 graph converted with
fp32 I/O still has fp32 I/O; a graph that does not would have fp16 I/O).

Threads: one runner = one execution context + one stream + one buffer set,
and it is not re-entrant; ``TensorRTEngine`` serialises calls with a lock.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from ..errors import EngineBuildError, EngineError
from . import cuda as cuda_rt
from .runtime import import_tensorrt, trt_logger

logger = logging.getLogger(__name__)


class TrtRunner:
    """One deserialized engine with its context, stream and buffers on one device."""

    def __init__(self, plan: bytes, device_id: int = 0, origin: str = "<bytes>") -> None:
        trt = import_tensorrt()
        self._trt = trt
        self.device_id = device_id
        cuda_rt.set_device(device_id)
        self._runtime = trt.Runtime(trt_logger())
        engine = self._runtime.deserialize_cuda_engine(plan)
        if engine is None:
            facts = cuda_rt.device_facts(device_id)
            raise EngineBuildError(
                f"TensorRT {trt.__version__} could not deserialize {origin} on {facts.name} "
                f"({facts.sm}); the plan was most likely built by another TensorRT version or for "
                "another GPU architecture (see the TensorRT error above); rebuild it for this host"
            )
        self.engine = engine
        self._resources: list[Any] = []
        try:
            self._bind_io()
            self._allocate()
        except BaseException:
            self.close()
            raise

    # -- loading ---------------------------------------------------------------------
    def _bind_io(self) -> None:
        trt, engine = self._trt, self.engine
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if n not in inputs]
        if len(inputs) != 1 or len(outputs) != 1:
            raise EngineBuildError(f"expected one input and one output tensor, got {inputs} -> {outputs}")
        self.input_name, self.output_name = inputs[0], outputs[0]
        in_shape = tuple(engine.get_tensor_shape(self.input_name))
        self.sample_shape = tuple(int(d) for d in in_shape[1:])
        if in_shape[0] == -1:
            lo, opt, hi = (tuple(s) for s in engine.get_tensor_profile_shape(self.input_name, 0))
            self.min_batch, self.opt_batch, self.max_batch = int(lo[0]), int(opt[0]), int(hi[0])
        else:
            self.min_batch = self.opt_batch = self.max_batch = int(in_shape[0])
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

    def describe(self) -> dict[str, Any]:
        return {
            "input": self.input_name, "output": self.output_name,
            "input_dtype": str(self.input_dtype), "output_dtype": str(self.output_dtype),
            "profile": [self.min_batch, self.opt_batch, self.max_batch],
            "embedding_dim": self.embedding_dim,
        }

    def close(self) -> None:
        """Free in reverse order; the stream is synced first so no copy is in flight."""
        self.context = None
        for resource in reversed(self._resources):
            try:
                if isinstance(resource, cuda_rt.Stream):
                    resource.synchronize()
                resource.close()
            except Exception as exc:  # teardown must not mask the error that caused it
                logger.warning("releasing %s failed: %s", type(resource).__name__, exc)
        self._resources.clear()
        self.engine = None
