"""ONNX Runtime backend: CPU everywhere, CUDA / TensorRT execution providers on GPU hosts.

Providers are taken from config in order (CUDA EP, CPU by default; the
TensorRT EP only if configured) and filtered to what this onnxruntime build
offers; asking for a GPU device when the build has no GPU provider is an error
that lists what is available. Before a GPU session, the CUDA libraries the CUDA
EP links (cuBLAS, cuRAND, cudart 13, cuDNN 9 from NVIDIA's PyPI wheels) are
loaded with ``onnxruntime.preload_dlls`` (README "GPU install"). On CUDA, I/O
binding keeps the output on the device until one copy back, instead of ORT's
implicit per-run allocations.
"""

from __future__ import annotations

import contextlib
import functools
import io
import logging
from typing import Any

import numpy as np

from ..base.engine import BaseEngine
from ..base.preprocess import NHWC_UINT8
from ..config.schema import OnnxConfig
from ..errors import BackendUnavailable
from ..hardware import cpu_has_int8_dot, device_index
from ..models.graph import graph_input_name
from ..models.int8_recipe import for_backend
from ..models.precision import CONVERTIBLE, convert_model
from ..models.resolve import ResolvedModel, cache_root
from ..tensorrt.plan_key import model_slug
from .registry import register

logger = logging.getLogger(__name__)

_OPT_LEVELS = {
    "disable": "ORT_DISABLE_ALL",
    "basic": "ORT_ENABLE_BASIC",
    "extended": "ORT_ENABLE_EXTENDED",
    "all": "ORT_ENABLE_ALL",
}
GPU_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")


def onnxruntime_build() -> dict[str, Any]:
    """Which onnxruntime distribution is importable and which providers it offers.

    ``onnxruntime`` and ``onnxruntime-gpu`` both install the ``onnxruntime``
    module; whichever was installed last wins. This tells which one did (the
    GPU build reports device ``GPU``), and says so in ``warning`` when both
    distributions are installed.
    """
    import importlib.metadata as md

    import onnxruntime as ort

    dists = {}
    for dist in ("onnxruntime", "onnxruntime-gpu"):
        try:
            dists[dist] = md.version(dist)
        except md.PackageNotFoundError:
            continue
    providers = ort.get_available_providers()
    # get_device() is compiled into the extension module: "GPU" only in the GPU build.
    # (Provider .so files are no evidence: installing the CPU wheel over the GPU one
    # leaves them behind while the CPU module takes over.)
    in_charge = "onnxruntime-gpu" if ort.get_device() == "GPU" else "onnxruntime"
    info: dict[str, Any] = {
        "version": ort.__version__,
        "distributions": dists,
        "in_charge": in_charge,
        "gpu_build": any(p in providers for p in GPU_PROVIDERS),
        "available_providers": providers,
    }
    if len(dists) == 2:
        info["warning"] = (
            f"both onnxruntime {dists['onnxruntime']} and onnxruntime-gpu {dists['onnxruntime-gpu']} "
            f"are installed; the module in use comes from {in_charge}. On a GPU host run "
            "`make install-gpu` (or: pip uninstall -y onnxruntime && pip install --force-reinstall "
            "--no-deps onnxruntime-gpu==<version>), see README 'GPU install'"
        )
    return info


@functools.lru_cache(maxsize=1)
def preload_cuda_libraries() -> str:
    """Load the CUDA EP's libraries from NVIDIA's wheels (``onnxruntime.preload_dlls``), once.

    What it printed (a library it could not load) is returned and logged, not
    printed. A build without ``preload_dlls`` (older, or CPU-only) is left alone.
    """
    import onnxruntime as ort

    preload = getattr(ort, "preload_dlls", None)
    if preload is None or ort.get_device() != "GPU":
        return ""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        preload()
    said = out.getvalue().strip()
    if said:
        logger.warning("onnxruntime.preload_dlls: %s", said.replace("\n", " | "))
    return said


def tensorrt_ep_options(
    model: ResolvedModel,
    input_name: str,
    cache_dir: str | None,
    opt_batch: int,
    max_batch: int,
    workspace_mb: int,
    engine_cache: bool = True,
) -> dict[str, Any]:
    """Options of ONNX Runtime's TensorRT execution provider for ``model``'s graph.

    One profile 1 / opt / max on the graph's input; no ``trt_fp16_enable``:
    the graph is already the converted one (TensorRT 11 has no FP16 flag), so
    the EP and the native backend build from the same bytes. Its engines and
    timing cache live under ``<cache>/engines/ort-trt``, named by model,
    graph sha8 and precision (ORT appends its own hash and the sm).
    """
    sample = "112x112x3" if model.input_layout == NHWC_UINT8 else "3x112x112"

    def shape(batch: int) -> str:
        return f"{input_name}:{batch}x{sample}"

    options: dict[str, Any] = {
        "trt_max_workspace_size": int(workspace_mb) << 20,
        "trt_profile_min_shapes": shape(1),
        "trt_profile_opt_shapes": shape(min(opt_batch, max_batch)),
        "trt_profile_max_shapes": shape(max_batch),
    }
    if engine_cache:
        where = str(cache_root(cache_dir) / "engines" / "ort-trt")
        options.update({
            "trt_engine_cache_enable": True,
            "trt_engine_cache_path": where,
            "trt_engine_cache_prefix": f"{model_slug(model.model_id)}-{model.sha256[:8]}-{model.precision}",
            "trt_timing_cache_enable": True,
            "trt_timing_cache_path": where,
        })
    return options


def select_providers(
    device: str, wanted: tuple[str, ...], available: list[str], provider_options: dict[str, dict]
) -> tuple[list[str], list[dict]]:
    """Ordered providers (and their options) for ``device`` from the configured list."""
    if device == "cpu":
        return ["CPUExecutionProvider"], [{}]
    gpu_wanted = [p for p in wanted if p in GPU_PROVIDERS]
    usable = [p for p in gpu_wanted if p in available]
    if not usable:
        raise BackendUnavailable(
            f"onnx backend on {device}: requested provider(s) {gpu_wanted or list(GPU_PROVIDERS)} "
            f"unavailable; available: {available}. Install the GPU build: "
            "pip install 'arcface-ray[gpu]' (see README 'GPU install')"
        )
    names = [*usable, "CPUExecutionProvider"]
    options = []
    for name in names:
        opts = dict(provider_options.get(name, {}))
        if name in GPU_PROVIDERS:
            opts.setdefault("device_id", device_index(device))
        options.append(opts)
    return names, options


@register("onnx")
class OnnxEngine(BaseEngine):
    """ONNX Runtime session over the resolved ONNX graph (fp32, or a converted fp16/int8 graph)."""

    required_package = "onnxruntime"
    runs_uint8_graph = True
    config_section = "onnx"
    settings_type = OnnxConfig

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._session = None
        self._io_binding = False

    @property
    def precision(self) -> str:
        return self.graph.precision

    def _session_options(self):
        import onnxruntime as ort

        settings: OnnxConfig = self.settings
        so = ort.SessionOptions()
        so.intra_op_num_threads = settings.intra_op_num_threads
        so.inter_op_num_threads = settings.inter_op_num_threads
        so.graph_optimization_level = getattr(ort.GraphOptimizationLevel,
                                              _OPT_LEVELS[settings.graph_optimization_level])
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.log_severity_level = 3
        return so

    def _start(self) -> None:
        self._require_package("the onnx backend",
                              also=" (on GPU hosts onnxruntime-gpu from the gpu extra provides it instead)")
        wanted = self.options.precision
        if wanted not in ("auto", self.model.precision):
            if wanted not in CONVERTIBLE or self.model.precision != "fp32":
                raise BackendUnavailable(
                    f"onnx backend cannot run {self.model.model_id} ({self.model.precision}) in "
                    f"{wanted}; it runs fp32 graphs and their {list(CONVERTIBLE)} conversions"
                )
            self.graph = convert_model(self.model, wanted, cache_dir=self.cache_dir,
                                       quantization=for_backend(self.options.quantization, "onnx"))
        self.graph = self._with_graph_preprocessing(self.graph)
        if self.graph.precision == "int8" and self.options.device == "cpu" and not cpu_has_int8_dot():
            # MLAS's AVX2 kernels sum u8 x s8 pairs in saturating int16 (vpmaddubsw): the
            # drift is several times the quantisation's own; the drift gate will say so.
            logger.warning(
                "int8 on a CPU without int8 dot products (VNNI / AMX): ONNX Runtime's AVX2 "
                "kernels saturate, expect large drift"
            )
        import onnxruntime as ort

        if self.options.device != "cpu":
            preload_cuda_libraries()
        providers, provider_options = select_providers(
            self.options.device,
            self.settings.providers,
            ort.get_available_providers(),
            self._tensorrt_ep(),
        )
        try:
            self._session = ort.InferenceSession(
                self.graph.path,
                sess_options=self._session_options(),
                providers=providers,
                provider_options=provider_options,
            )
        except Exception as exc:
            raise BackendUnavailable(f"onnxruntime cannot load {self.graph.path}: {exc}") from exc
        active = self._session.get_providers()
        if self.options.device != "cpu" and not any(p in active for p in GPU_PROVIDERS):
            raise BackendUnavailable(
                f"onnx backend asked for {self.options.device} with {providers} but the session "
                f"runs on {active}"
            )
        self._io_binding = self.settings.io_binding and "CUDAExecutionProvider" in active
        inputs, outputs = self._session.get_inputs(), self._session.get_outputs()
        if len(inputs) != 1 or len(outputs) != 1:
            raise BackendUnavailable(
                f"{self.graph.path}: expected one input and one output, got "
                f"{[i.name for i in inputs]} -> {[o.name for o in outputs]}"
            )
        self._input, self._output = inputs[0].name, outputs[0].name
        dim = outputs[0].shape[-1]
        self._embedding_dim = int(dim) if isinstance(dim, int) else None
        warm = self._run(self._warm_input(1))
        self._embedding_dim = int(warm.shape[-1])

    def _tensorrt_ep(self) -> dict[str, dict]:
        """TensorRT EP options, only when this session may use that provider."""
        if self.options.device == "cpu" or "TensorrtExecutionProvider" not in self.settings.providers:
            return {}
        options = tensorrt_ep_options(
            self.graph,
            graph_input_name(self.graph.path),
            self.cache_dir,
            self.options.opt_batch_size,
            self.options.max_batch_size,
            self.options.workspace_size_mb,
            engine_cache=self.settings.trt_engine_cache,
        )
        return {"TensorrtExecutionProvider": options}

    def _run(self, blob: np.ndarray) -> np.ndarray:
        session = self._session
        if self._io_binding:
            binding = session.io_binding()
            binding.bind_cpu_input(self._input, blob)
            binding.bind_output(self._output, "cuda", device_index(self.options.device))
            session.run_with_iobinding(binding)
            return binding.copy_outputs_to_cpu()[0]
        return session.run([self._output], {self._input: blob})[0]

    def _runtime_info(self) -> dict[str, Any]:
        info = onnxruntime_build()
        info["active_providers"] = self._session.get_providers() if self._session else []
        info["io_binding"] = self._io_binding
        return {"onnxruntime": info}

    def close(self) -> None:
        self._session = None
        super().close()
