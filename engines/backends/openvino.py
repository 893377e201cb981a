"""OpenVINO backend: the CPU fast path (bf16 on AVX512-BF16 / AMX cores).

Why OpenVINO on CPU: its CPU plugin runs the ONNX graph's convolutions with
oneDNN kernels in the *inference precision* we ask for. ``bf16`` keeps fp32
weights, inputs and outputs but computes in bfloat16 on cores with native bf16
dot products (``avx512_bf16``, ``amx_bf16``): on IResNet-50 that is 2-4x ONNX
Runtime's fp32 speed. bf16 is not free of drift, which is why ``auto`` only
keeps a reduced precision that the startup drift gate has accepted on this
CPU (``factory.load_engine``: a refused ``openvino`` retries as
``openvino:fp32`` before the chain moves on).

Throughput comes from streams, not threads: with the ``throughput`` hint the
plugin compiles one stream per group of cores and ``_run`` splits every batch
across that many asynchronous infer requests, so each core works on its own
slice with no synchronisation between layers. One request spread over all
cores (the ``latency`` hint) is slower for batches, faster for one face.

Precisions: ``fp32`` everywhere; ``bf16`` / ``fp16`` only where the plugin
computes them natively (elsewhere OpenVINO silently falls back to f32, and
``info`` would lie); ``int8`` runs the symmetric Q/DQ graph
``precision.convert_model`` writes, on int8 dot products (VNNI / AMX).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from ..base.engine import BaseEngine
from ..config.schema import OpenVinoConfig
from ..errors import BackendUnavailable
from ..hardware import cpu_has_bf16, cpu_has_fp16, cpu_has_int8_dot
from ..models.int8_recipe import for_backend
from ..models.precision import convert_model
from .registry import register

logger = logging.getLogger(__name__)

# OpenVINO's inference-precision name for each precision we expose. int8 is a
# property of the Q/DQ graph; what is not quantised runs in f32.
OV_PRECISION = {"fp32": "f32", "bf16": "bf16", "fp16": "f16", "int8": "f32"}
# OPTIMIZATION_CAPABILITIES entry the CPU plugin reports for native support.
_OV_CAPABILITY = {"fp32": "FP32", "bf16": "BF16", "fp16": "FP16", "int8": "INT8"}


def supported_precisions() -> dict[str, str | None]:
    """Each precision -> ``None`` if this CPU computes it natively, else why not.

    Cheap (CPU flags only); ``_start`` checks OpenVINO's own capability list too.
    """
    return {
        "fp32": None,
        "bf16": None if cpu_has_bf16() else "the CPU has neither AMX-BF16 nor AVX512-BF16",
        "fp16": None if cpu_has_fp16() else "the CPU has neither AMX-FP16 nor AVX512-FP16",
        "int8": None if cpu_has_int8_dot() else "no int8 dot product (AMX, AVX512-VNNI, AVX-VNNI)",
    }


def auto_precision(order: tuple[str, ...]) -> str:
    """The first precision of ``order`` this CPU runs natively (``fp32`` at worst)."""
    ok = supported_precisions()
    return next((p for p in order if ok.get(p, "unknown") is None), "fp32")


@register("openvino")
class OpenVinoEngine(BaseEngine):
    """OpenVINO CPU plugin over the ONNX graph; each batch split across the plugin's streams."""

    # one AsyncInferQueue serves every call, and each call already uses every stream
    _serialize_runs = True
    auto_may_reduce_precision = True
    required_package = "openvino"
    runs_uint8_graph = True
    config_section = "openvino"
    settings_type = OpenVinoConfig

    @classmethod
    def retry_precisions(cls, settings: OpenVinoConfig | None) -> tuple[str, ...]:
        """After ``auto``'s pick, each further natively supported precision of ``auto_precisions``
        (int8 refused by the gate: bf16 next), then fp32."""
        ok = supported_precisions()
        order = [p for p in (settings or OpenVinoConfig()).auto_precisions if ok.get(p, "unknown") is None]
        return tuple(dict.fromkeys([*order[1:], "fp32"]))

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._compiled: Any = None
        self._queue: Any = None
        self._n_requests = 1
        self._precision: str | None = None
        self._properties: dict[str, str] = {}
        self._version = ""

    @property
    def precision(self) -> str:
        return self._precision or self.options.precision

    def _resolve_precision(self) -> str:
        wanted = self.options.precision
        if self.model.precision != "fp32":
            if wanted not in ("auto", self.model.precision):
                raise BackendUnavailable(
                    f"openvino backend cannot run {self.model.model_id} ({self.model.precision} graph) "
                    f"in {wanted}; give it the fp32 model"
                )
            return self.model.precision
        if wanted == "auto":
            return auto_precision(self.settings.auto_precisions)
        if wanted not in OV_PRECISION:
            raise BackendUnavailable(f"openvino backend runs {sorted(OV_PRECISION)}, not {wanted!r}")
        why_not = supported_precisions()[wanted]
        if why_not:
            raise BackendUnavailable(
                f"openvino {wanted} needs native support: {why_not}; use precision fp32 or auto"
            )
        return wanted

    def _compile_properties(self, precision: str) -> dict[str, Any]:
        ov_cfg: OpenVinoConfig = self.settings
        props: dict[str, Any] = {
            "INFERENCE_PRECISION_HINT": OV_PRECISION[precision],
            "PERFORMANCE_HINT": ov_cfg.performance_hint.upper(),
        }
        if ov_cfg.num_streams > 0:
            props["NUM_STREAMS"] = ov_cfg.num_streams
        if ov_cfg.num_threads > 0:
            props["INFERENCE_NUM_THREADS"] = ov_cfg.num_threads
        return props

    def _start(self) -> None:
        self._require_package("the openvino backend")
        if self.options.device != "cpu":
            raise BackendUnavailable(
                f"openvino backend runs on the CPU only, device {self.options.device!r} was asked; "
                "use tensorrt or onnx on GPU hosts"
            )
        precision = self._resolve_precision()
        import openvino as ov

        core = ov.Core()
        capabilities = set(core.get_property("CPU", "OPTIMIZATION_CAPABILITIES"))
        if _OV_CAPABILITY[precision] not in capabilities:
            raise BackendUnavailable(
                f"OpenVINO's CPU plugin does not run {precision} natively on this CPU "
                f"(capabilities {sorted(capabilities)})"
            )
        graph = self.model
        if precision == "int8" and graph.precision == "fp32":
            graph = convert_model(graph, "int8", cache_dir=self.cache_dir,
                                  quantization=for_backend(self.options.quantization, "openvino"))
        graph = self._with_graph_preprocessing(graph)
        props = self._compile_properties(precision)
        try:
            compiled = core.compile_model(graph.path, "CPU", props)
        except Exception as exc:  # OpenVINO raises RuntimeError subclasses with no common base
            raise BackendUnavailable(f"openvino cannot compile {graph.path} with {props}: {exc}") from exc
        if len(compiled.inputs) != 1 or len(compiled.outputs) != 1:
            raise BackendUnavailable(
                f"{graph.path}: expected one input and one output, got "
                f"{len(compiled.inputs)} -> {len(compiled.outputs)}"
            )
        actual = compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()
        if actual != OV_PRECISION[precision]:
            raise BackendUnavailable(
                f"openvino was asked for inference precision {OV_PRECISION[precision]} but compiled "
                f"the model in {actual}; refusing to report a precision that does not run"
            )
        self._n_requests = max(1, int(compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS")))
        self._queue = ov.AsyncInferQueue(compiled, self._n_requests)
        self._queue.set_callback(_collect)
        self._compiled = compiled
        self.graph = graph
        self._precision = precision
        self._version = ov.get_version()
        self._properties = {
            key: str(compiled.get_property(key))
            for key in ("PERFORMANCE_HINT", "NUM_STREAMS", "INFERENCE_NUM_THREADS",
                        "OPTIMAL_NUMBER_OF_INFER_REQUESTS")
        }
        self._properties["INFERENCE_PRECISION_HINT"] = actual
        warm = self._run(self._warm_input(self._n_requests))
        self._embedding_dim = int(warm.shape[-1])

    def _run(self, blob: np.ndarray) -> np.ndarray:
        """Split the batch into one slice per stream, run them at once, keep the order."""
        n = blob.shape[0]
        parts = min(self._n_requests, n)
        edges = np.linspace(0, n, parts + 1).astype(int)
        outputs: list[np.ndarray | None] = [None] * parts
        for i in range(parts):
            piece = np.ascontiguousarray(blob[edges[i] : edges[i + 1]])
            self._queue.start_async({0: piece}, (outputs, i))
        self._queue.wait_all()
        if any(out is None for out in outputs):
            raise BackendUnavailable("openvino: an infer request finished without output")
        return outputs[0] if parts == 1 else np.concatenate(outputs)

    def _runtime_info(self) -> dict[str, Any]:
        return {
            "openvino": {
                "version": self._version,
                "properties": self._properties,
                "infer_requests": self._n_requests,
                "cpu_precisions": supported_precisions(),
            }
        }

    def close(self) -> None:
        if self._queue is not None:
            self._queue.wait_all()
        self._compiled = None
        self._queue = None
        super().close()


def _collect(request: Any, userdata: tuple[list, int]) -> None:
    """AsyncInferQueue callback: copy the output out (the request reuses its tensor)."""
    outputs, index = userdata
    outputs[index] = np.array(request.get_output_tensor(0).data, dtype=np.float32, copy=True)
