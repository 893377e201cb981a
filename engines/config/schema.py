"""The configuration's shape: frozen, typed dataclasses, one per section of ``config/*.yaml``.

Every key the README documents is a field here, with its default written once;
``metadata`` carries the choices and bounds the validator (``typed.py``)
enforces. Loading and environment overrides are ``loader.py``'s.
"""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BACKEND_NAMES = ("auto", "tensorrt", "onnx", "openvino", "insightface")
PRECISIONS = ("auto", "fp32", "fp16", "bf16", "int8")
# embedding.tensorrt_config default: read from beside the config file when it exists
DEFAULT_TENSORRT_CONFIG = "arcface_tensorrt.yaml"


def batch_order_error(sizes: dict[str, int]) -> str | None:
    """The one batch-size rule: ``None`` if every size is >= 1 and they do not decrease in
    the order given (e.g. ``{"min_batch": 1, "opt_batch": 32, "max_batch": 128}``), else the
    first violation, naming both sizes. Config files, engine options and TensorRT build
    settings all ask this function, so the rule cannot drift between them."""
    items = list(sizes.items())
    for name, value in items:
        if value < 1:
            return f"{name} must be >= 1, got {value}"
    for (low, low_v), (high, high_v) in itertools.pairwise(items):
        if low_v > high_v:
            return f"{low} ({low_v}) must be <= {high} ({high_v})"
    return None


def _choices(*values: str) -> dict[str, Any]:
    return {"choices": values}


@dataclass(frozen=True)
class StorageConfig:
    """Where models and engines are cached locally and shared through S3."""

    type: str = field(default="local", metadata=_choices("local", "s3"))
    bucket: str | None = None
    prefix: str = "arcface"
    cache_dir: str = "~/.cache/arcface"
    endpoint_url: str | None = None
    region: str | None = None

    @property
    def cache_path(self) -> Path:
        return Path(os.path.expanduser(self.cache_dir))


@dataclass(frozen=True)
class ValidationConfig:
    """Startup drift gate: a backend whose embeddings drift from the reference is refused."""

    enabled: bool = True
    max_drift_cosine: float = field(default=0.001, metadata={"min": 0.0, "max": 2.0})
    eval_set_size: int = field(default=32, metadata={"min": 2})
    run_on_startup: bool = False
    gate_reduced_precision: bool = True
    reference_backend: str = field(default="insightface", metadata=_choices("insightface", "onnx"))


@dataclass(frozen=True)
class OnnxConfig:
    """ONNX Runtime session settings for the ``onnx`` backend."""

    # ORT's TensorRT EP is not in the default: onnxruntime-gpu 1.31's links TensorRT 10
    # (libnvinfer.so.10) and the GPU stack is TensorRT 11 (README "GPU install").
    providers: tuple[str, ...] = ("CUDAExecutionProvider", "CPUExecutionProvider")
    intra_op_num_threads: int = field(default=0, metadata={"min": 0})
    inter_op_num_threads: int = field(default=0, metadata={"min": 0})
    graph_optimization_level: str = field(
        default="all", metadata=_choices("disable", "basic", "extended", "all")
    )
    io_binding: bool = True
    trt_engine_cache: bool = True


@dataclass(frozen=True)
class OpenVinoConfig:
    """OpenVINO CPU plugin settings for the ``openvino`` backend."""

    performance_hint: str = field(default="throughput", metadata=_choices("throughput", "latency"))
    num_streams: int = field(default=0, metadata={"min": 0})
    num_threads: int = field(default=0, metadata={"min": 0})
    auto_precisions: tuple[str, ...] = field(
        default=("bf16", "fp32"), metadata=_choices("bf16", "fp16", "int8", "fp32")
    )


@dataclass(frozen=True)
class QuantizationConfig:
    """How the int8 graph is made (``engines/models/int8_recipe.py``); every key changes the graph,
    so every key is part of the converted file's name and of the cached search's key."""

    # min-max, a percentile of each tensor's histogram, or ORT's entropy (KL) calibration
    calibration_method: str = field(default="percentile",
                                    metadata=_choices("percentile", "minmax", "entropy"))
    calibration_percentile: float = field(default=99.999, metadata={"min": 90.0, "max": 100.0})
    calibration_faces: int = field(default=64, metadata={"min": 1})
    # auto: keep in fp32 the weighted layers the sensitivity search finds it must (mixed int8);
    # none: every Conv / Gemm in int8 (full int8: fastest, drifts most)
    keep_fp32: str = field(default="auto", metadata=_choices("auto", "none"))
    # Q/DQ on the weighted layers' outputs too: ONNX Runtime fuses DQ -> Conv -> Q into QLinearConv
    # only with it (else int8 runs at fp32 speed); OpenVINO and TensorRT run int8 from the inputs'
    # Q/DQ alone, and each extra Q/DQ adds rounding noise. auto: always for the onnx backend, never
    # for openvino / tensorrt (and ``arcface models convert``)
    quantize_outputs: str = field(default="auto", metadata=_choices("auto", "always", "never"))
    # the search stops excluding layers once min cosine to fp32 on search_faces eval faces >= this
    target_min_cosine: float = field(default=0.9992, metadata={"min": 0.0, "max": 1.0})
    search_faces: int = field(default=64, metadata={"min": 2})


@dataclass(frozen=True)
class EmbeddingConfig:
    """The ``embedding`` section: which model, which backend chain, which batch limits."""

    backend: str = field(default="auto", metadata=_choices(*BACKEND_NAMES))
    model: str = "synthetic:iresnet50"
    precision: str = field(default="auto", metadata=_choices(*PRECISIONS))
    device: str = "auto"
    batch_size: int = field(default=32, metadata={"min": 1})
    opt_batch_size: int = field(default=32, metadata={"min": 1})
    max_batch_size: int = field(default=128, metadata={"min": 1})
    workspace_size_mb: int = field(default=2048, metadata={"min": 16})
    fallback: tuple[str, ...] = ("onnx", "insightface")
    tensorrt_config: str | None = DEFAULT_TENSORRT_CONFIG
    # graph: the preprocessing as ONNX nodes in front of the model (uint8 crops in) on the
    # backends that run it; host: numpy to_blob; auto: graph (the insightface reference
    # keeps its own preprocessing whatever this says)
    preprocess: str = field(default="auto", metadata=_choices("auto", "graph", "host"))


@dataclass(frozen=True)
class TensorRTConfig:
    """``config/arcface_tensorrt.yaml``: engine build and engine-cache settings."""

    precision: str = field(default="fp16", metadata=_choices("fp32", "fp16", "int8"))
    min_batch_size: int = field(default=1, metadata={"min": 1})
    opt_batch_size: int = field(default=32, metadata={"min": 1})
    max_batch_size: int = field(default=128, metadata={"min": 1})
    workspace_size_mb: int = field(default=2048, metadata={"min": 16})
    device_id: int = field(default=0, metadata={"min": 0})
    build_locally: bool = True
    timing_cache: bool = True
    hardware_compatibility: str = field(
        default="none", metadata=_choices("none", "ampere_plus", "same_compute_capability")
    )
    lock_ttl_s: float = field(default=900.0, metadata={"min": 1.0})
    wait_timeout_s: float = field(default=1800.0, metadata={"min": 1.0})
    storage: StorageConfig = field(default_factory=StorageConfig)


@dataclass(frozen=True)
class IdentityConfig:
    """The gallery and 1:N decisions (``identity:`` in embedding.yaml; README "Gallery and identify").
    The two cosine settings are model-specific: calibrate them (``arcface gallery calibrate``)."""

    gallery: str | None = None  # default gallery (local path or s3://) for the CLI and the service
    threshold: float = field(default=0.5, metadata={"min": -1.0, "max": 1.0})
    top_k: int = field(default=5, metadata={"min": 1})
    cluster_distance: float = field(default=0.5, metadata={"min": 0.0, "max": 2.0})
    template_weighting: str = field(default="norm", metadata=_choices("norm", "uniform"))
    fps: float = field(default=25.0, metadata={"min": 0.001})


@dataclass(frozen=True)
class Config:
    """Everything ``config/embedding.yaml`` holds."""

    embedding: EmbeddingConfig = field(default_factory=EmbeddingConfig)
    onnx: OnnxConfig = field(default_factory=OnnxConfig)
    openvino: OpenVinoConfig = field(default_factory=OpenVinoConfig)
    quantization: QuantizationConfig = field(default_factory=QuantizationConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    tensorrt: TensorRTConfig = field(default_factory=TensorRTConfig)
    identity: IdentityConfig = field(default_factory=IdentityConfig)
    source: str = field(default="<defaults>", metadata={"internal": True})
