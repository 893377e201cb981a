"""TensorRT backend: the production GPU path.

The start-up reads as one sentence: resolve the key -> plan bytes from the
cache or a build (``tensorrt.plan_cache.get_or_build_plan``) -> engine from bytes
-> runner (``tensorrt.runner.TrtRunner``), then a warm-up at the opt and max batch.
A plan TensorRT refuses to deserialise is quarantined and rebuilt once
(``plan_cache.load_with_one_rebuild``). Only a real TensorRT API mismatch (a
name or argument the installed bindings reject, ``runtime.is_api_mismatch``)
becomes "API mismatch"; other errors stay what they are.
Everything before and after the runtime call (validation, the shared
preprocessing with its BGR->RGB swap, chunking, L2 normalisation) is
``BaseEngine``'s, exactly as for every other backend.

Threads: one execution context, one stream and one buffer set per engine, and
calls are serialised with the base class's lock (``_serialize_runs``). Each
context owns its activation memory (``device_memory_size_v2``: hundreds of
MiB for R50 at batch 128), and the shells call an engine from one thread per
replica or actor anyway; more throughput comes from more replicas/actors
(fractional GPUs), not from threads sharing one engine.

CUDA is initialised in ``_start`` only, i.e. inside the Ray actor or process
that serves; ``availability()`` never touches the driver.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import replace
from typing import Any

import numpy as np

from ..base.engine import BaseEngine
from ..config.schema import TensorRTConfig
from ..errors import BackendUnavailable, EngineBuildError
from ..hardware import device_index, has_cuda
from ..models.int8_recipe import for_backend
from ..tensorrt.runtime import cuda_python_installed, is_api_mismatch, tensorrt_installed
from .registry import register

logger = logging.getLogger(__name__)

BUILDABLE = ("fp32", "fp16", "int8")


@register("tensorrt")
class TensorRTEngine(BaseEngine):
    """A TensorRT engine built (or fetched) for this GPU from the model's converted graph."""

    _serialize_runs = True
    runs_uint8_graph = True  # a uint8 input binding: the device does the preprocessing
    config_section = "tensorrt"
    settings_type = TensorRTConfig

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._runner = None
        self._entry = None
        self._memory: dict[str, int] = {}

    @classmethod
    def availability(cls) -> str | None:
        reasons = []
        if not tensorrt_installed():
            reasons.append("the 'tensorrt' package is not installed (pip install 'arcface-ray[gpu]')")
        if not cuda_python_installed():
            reasons.append("the 'cuda-python' package is not installed (pip install 'arcface-ray[gpu]')")
        if not has_cuda():
            reasons.append("no CUDA device is visible to this process")
        return "; ".join(reasons) or None

    def _trt_config(self) -> TensorRTConfig:
        trt_cfg: TensorRTConfig = self.settings
        wanted = self.options.precision
        if wanted == "auto":
            wanted = trt_cfg.precision
        if wanted not in BUILDABLE:
            raise BackendUnavailable(
                f"the tensorrt backend builds {list(BUILDABLE)} graphs, not {wanted!r}; "
                "set embedding.precision to one of them (or auto)"
            )
        if self.model.precision not in ("fp32", wanted):
            raise BackendUnavailable(
                f"{self.model.model_id} is already a {self.model.precision} graph; the tensorrt "
                f"backend converts from fp32, so it cannot build {wanted} from it"
            )
        return replace(trt_cfg, precision=wanted)

    def _start(self) -> None:
        reasons = [r for r in (self.availability(),) if r]
        if self.options.device == "cpu":
            reasons.insert(0, "the engine's device is cpu (TensorRT needs a CUDA device)")
        if reasons:
            raise BackendUnavailable(f"the tensorrt backend cannot run here: {'; '.join(reasons)}")
        from ..drift_gate import conversion_drift
        from ..tensorrt.plan_cache import LocalPlanCache, get_or_build_plan, load_with_one_rebuild
        from ..tensorrt.runner import TrtRunner

        trt_cfg = self._trt_config()
        device_id = device_index(self.options.device)
        measure = functools.partial(conversion_drift, max_drift=self.options.max_drift_cosine,
                                    cache_dir=trt_cfg.storage.cache_dir)

        def resolve(rebuild: bool):
            return get_or_build_plan(self.model, trt_cfg, device_id=device_id, measure_drift=measure,
                                     rebuild=rebuild, prepare=self._with_graph_preprocessing,
                                     quantization=for_backend(self.options.quantization, "tensorrt"))

        def load(entry) -> TrtRunner:
            return TrtRunner(entry.read_verified(), device_id, origin=str(entry.path))

        try:
            entry, runner = load_with_one_rebuild(resolve, load, LocalPlanCache.for_storage(trt_cfg.storage),
                                                  lock_timeout_s=trt_cfg.wait_timeout_s)
        except (AttributeError, TypeError) as exc:
            if not is_api_mismatch(exc):
                raise  # our bug: the fallback chain reports it as a failed start, traceback logged
            # A name or argument this TensorRT build rejects: yield to the next backend.
            raise EngineBuildError(
                f"TensorRT API mismatch ({type(exc).__name__}: {exc}); this backend is written "
                "for the TensorRT 10.x / 11.x Python API"
            ) from exc
        self.graph = entry.graph or self.model
        try:
            runner.warm_up()
            self._memory = runner.memory()
        except BaseException:
            runner.close()
            raise
        self._entry, self._runner = entry, runner
        self._embedding_dim = runner.embedding_dim
        logger.info(
            "TensorRT engine %s (%s) on %s: activations %.0f MiB, device free %.0f / %.0f MiB",
            entry.key, entry.source, self.options.device, self._memory["engine_activation_bytes"] / 2**20,
            self._memory["device_free_bytes"] / 2**20, self._memory["device_total_bytes"] / 2**20,
        )

    @property
    def precision(self) -> str:
        return self.graph.precision

    def _run(self, blob: np.ndarray) -> np.ndarray:
        return self._runner.run(blob)

    def layer_precisions(self) -> dict[str, int]:
        """Layer outputs per data type, from TensorRT's engine inspector (``TrtRunner.layer_precisions``).

        The proof that an fp16 engine computes in fp16: parity alone cannot tell a plan
        TensorRT 10 quietly built in fp32.
        """
        self.ensure_ready()
        with self._run_lock:
            return self._runner.layer_precisions()

    def _engine_path(self) -> str:
        return str(self._entry.path) if self._entry else self.graph.path

    def _runtime_info(self) -> dict[str, Any]:
        if self._entry is None or self._runner is None:
            return {}
        side = self._entry.sidecar
        return {"tensorrt": {
            "version": side.get("tensorrt_version"),
            "engine_key": self._entry.key,
            "engine_source": self._entry.source,
            "engine_sha256": side.get("sha256"),
            "gpu_name": side.get("gpu_name"),
            "compute_capability": side.get("compute_capability"),
            "builder_settings": side.get("builder_settings"),
            "io": self._runner.describe(),
            "memory": self._memory,
            "threading": "one context/stream/buffer set per engine; calls serialised by a lock",
        }}

    def close(self) -> None:
        if self._runner is not None:
            with self._run_lock:
                self._runner.close()
            self._runner = None
        super().close()
