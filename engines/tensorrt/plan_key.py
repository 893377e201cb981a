"""The name of a TensorRT engine: what it was built from, with what, for which GPU.

A serialized engine runs only on the GPU architecture and the exact TensorRT
version that built it, and only for the precision and batch profile it was
built with; all of that goes into its key, so a cache hit is always loadable:

    {model}-{sha8}-{precision}-sm{major}{minor}-trt{version}-b{min}_{opt}_{max}.plan

``sha8`` is of the ONNX graph actually built (after precision conversion).
A non-default hardware-compatibility level adds ``-hc_{level}`` before
``.plan`` (such a plan is a different binary for the same inputs).
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Any

from ..config.schema import batch_order_error
from ..models.resolve import ResolvedModel

PLAN_SUFFIX = ".plan"
_KEY_RE = re.compile(
    r"^(?P<model>.+)-(?P<sha8>[0-9a-f]{8})-(?P<precision>fp32|fp16|int8)-sm(?P<sm>\d+)"
    r"-trt(?P<trt>[0-9][0-9.]*)-b(?P<min>\d+)_(?P<opt>\d+)_(?P<max>\d+)(?:-hc_(?P<hc>[a-z_]+))?\.plan$"
)


@dataclass(frozen=True)
class BuildTarget:
    """The GPU facts an engine is specific to.

    Defaults to detection on the real device (``detect_build_target``); tests
    and cross-checks pass one explicitly, which is a parameter, not a mock.
    """

    compute_capability: tuple[int, int]
    trt_version: str
    gpu_name: str = "unknown"

    @property
    def sm(self) -> str:
        major, minor = self.compute_capability
        return f"sm{major}{minor}"

    def to_dict(self) -> dict[str, Any]:
        return {"compute_capability": f"{self.compute_capability[0]}.{self.compute_capability[1]}",
                "sm": self.sm, "trt_version": self.trt_version, "gpu_name": self.gpu_name}


@dataclass(frozen=True)
class BuildSettings:
    """Builder inputs that change the plan bytes (and so the key or the sidecar)."""

    precision: str = "fp16"
    min_batch: int = 1
    opt_batch: int = 32
    max_batch: int = 128
    workspace_mb: int = 2048
    hardware_compatibility: str = "none"
    timing_cache: bool = True

    def __post_init__(self) -> None:
        problem = batch_order_error({"min_batch": self.min_batch, "opt_batch": self.opt_batch,
                                     "max_batch": self.max_batch})
        if problem:
            raise ValueError(f"optimization profile needs 1 <= min <= opt <= max: {problem}")

    @classmethod
    def from_config(cls, trt_cfg: Any) -> BuildSettings:
        return cls(
            precision=trt_cfg.precision,
            min_batch=trt_cfg.min_batch_size,
            opt_batch=trt_cfg.opt_batch_size,
            max_batch=trt_cfg.max_batch_size,
            workspace_mb=trt_cfg.workspace_size_mb,
            hardware_compatibility=trt_cfg.hardware_compatibility,
            timing_cache=trt_cfg.timing_cache,
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def model_slug(model_id: str) -> str:
    """A model id safe for a file name and an S3 key (``buffalo_l/w600k_r50`` -> ``buffalo_l_w600k_r50``)."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", model_id).strip("_-") or "model"


def plan_key(graph: ResolvedModel, settings: BuildSettings, target: BuildTarget) -> str:
    """The cache key of the engine built from ``graph`` (already in ``settings.precision``)."""
    if graph.precision != settings.precision:
        raise ValueError(
            f"engine key: graph {graph.model_id} is {graph.precision} but the build asks for "
            f"{settings.precision}; convert the graph first (precision.convert_model)"
        )
    version = re.sub(r"[^0-9.]", "", target.trt_version) or "0"
    key = (
        f"{model_slug(graph.model_id)}-{graph.sha256[:8]}-{settings.precision}-{target.sm}"
        f"-trt{version}-b{settings.min_batch}_{settings.opt_batch}_{settings.max_batch}"
    )
    if settings.hardware_compatibility != "none":
        key += f"-hc_{settings.hardware_compatibility}"
    return key + PLAN_SUFFIX


def parse_key(key: str) -> dict[str, str] | None:
    """The fields of a key, or ``None`` if ``key`` is not an engine key."""
    match = _KEY_RE.match(key)
    return match.groupdict() if match else None


def detect_build_target(device_id: int = 0, trt_version: str | None = None) -> BuildTarget:
    """Compute capability and name of ``device_id`` (cuda-python) and the TensorRT version.

    Initialises CUDA in the calling process: call it where the engine will run.
    ``trt_version`` lets a host without TensorRT compute the key it would need.
    """
    from . import cuda as cuda_rt

    facts = cuda_rt.device_facts(device_id)
    if trt_version is None:
        from .runtime import trt_version as installed_version

        trt_version = installed_version()
    return BuildTarget((facts.major, facts.minor), trt_version, facts.name)
