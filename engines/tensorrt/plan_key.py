"""The name of a TensorRT engine: what it was built from, with what, for which GPU.

A serialized engine runs only where it was built: the same TensorRT build
(version *and* the CUDA major it was compiled for: ``tensorrt-cu12`` and
``-cu13`` publish the same version string), the same compute capability, and,
as TensorRT warns, the same device model (an H100 and an H200 are both sm90).
It is also specific to the precision and batch profile it was built with. All
of that goes into its key, so a cache hit is always loadable:

    {model}-{sha8}-{precision}-{hw}-trt{version}-cu{cuda}-b{min}_{opt}_{max}[-hc_{level}].plan

``sha8`` is of the ONNX graph actually built (after precision conversion).
``hw`` follows the hardware-compatibility level, so a plan is shared exactly
as widely as TensorRT allows:

- ``none`` (default): ``sm{major}{minor}-d{dev6}``, ``dev6`` six hex digits of
  the sha256 of the device name (one device model);
- ``same_compute_capability``: ``sm{major}{minor}`` (any device of that capability);
- ``ampere_plus``: ``ampere_plus`` (any sm80+ device).

The two non-default levels also add ``-hc_{level}`` (a different binary for
the same inputs). The sidecar repeats these facts and ``plan_mismatch`` checks
them against the host on every load, so a renamed or mislabelled plan is
rebuilt, not loaded.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import asdict, dataclass
from typing import Any

from ..config.schema import batch_order_error
from ..models.resolve import ResolvedModel

PLAN_SUFFIX = ".plan"
_KEY_RE = re.compile(
    r"^(?P<model>.+)-(?P<sha8>[0-9a-f]{8})-(?P<precision>fp32|fp16|int8)"
    r"-(?:sm(?P<sm>\d+)(?:-d(?P<device>[0-9a-f]{6}))?|(?P<family>ampere_plus))"
    r"-trt(?P<trt>[0-9][0-9.]*)-cu(?P<cuda>\d+|unknown)-b(?P<min>\d+)_(?P<opt>\d+)_(?P<max>\d+)"
    r"(?:-hc_(?P<hc>[a-z_]+))?\.plan$"
)
AMPERE = (8, 0)


@dataclass(frozen=True)
class BuildTarget:
    """The GPU facts an engine is specific to.

    Defaults to detection on the real device (``detect_build_target``); tests
    and cross-checks pass one explicitly, which is a parameter, not a mock.
    """

    compute_capability: tuple[int, int]
    trt_version: str
    gpu_name: str = "unknown"
    # CUDA major the TensorRT build was compiled for (``tensorrt-cu13`` -> 13); None: unknown
    trt_cuda_major: int | None = None

    @property
    def sm(self) -> str:
        major, minor = self.compute_capability
        return f"sm{major}{minor}"

    @property
    def device_tag(self) -> str:
        """``d`` + six hex digits of the device name's sha256: the device model, file-name safe."""
        return "d" + hashlib.sha256(self.gpu_name.strip().encode()).hexdigest()[:6]

    @property
    def cuda_tag(self) -> str:
        return f"cu{self.trt_cuda_major}" if self.trt_cuda_major is not None else "cuunknown"

    def hardware_tag(self, hardware_compatibility: str) -> str:
        """What of the GPU the plan is specific to, at ``hardware_compatibility``."""
        if hardware_compatibility == "ampere_plus":
            return "ampere_plus"
        if hardware_compatibility == "same_compute_capability":
            return self.sm
        return f"{self.sm}-{self.device_tag}"

    def to_dict(self) -> dict[str, Any]:
        return {"compute_capability": f"{self.compute_capability[0]}.{self.compute_capability[1]}",
                "sm": self.sm, "trt_version": self.trt_version, "gpu_name": self.gpu_name,
                "device_tag": self.device_tag, "trt_cuda_major": self.trt_cuda_major}


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
    if settings.hardware_compatibility == "ampere_plus" and target.compute_capability < AMPERE:
        raise ValueError(
            f"hardware_compatibility ampere_plus needs an sm80+ build device; this one is {target.sm}"
        )
    version = re.sub(r"[^0-9.]", "", target.trt_version) or "0"
    key = (
        f"{model_slug(graph.model_id)}-{graph.sha256[:8]}-{settings.precision}"
        f"-{target.hardware_tag(settings.hardware_compatibility)}-trt{version}-{target.cuda_tag}"
        f"-b{settings.min_batch}_{settings.opt_batch}_{settings.max_batch}"
    )
    if settings.hardware_compatibility != "none":
        key += f"-hc_{settings.hardware_compatibility}"
    return key + PLAN_SUFFIX


def plan_mismatch(sidecar: dict[str, Any], target: BuildTarget, settings: BuildSettings) -> str | None:
    """Why the plan ``sidecar`` describes cannot run on ``target`` (None: it can).

    The key already encodes these facts; this re-checks them from the sidecar
    the builder wrote, so a plan copied under the wrong name is never loaded.
    A sidecar written before a fact was recorded is not refused for lacking it.
    """
    problems = []
    if sidecar.get("tensorrt_version") not in (None, target.trt_version):
        problems.append(f"TensorRT {sidecar['tensorrt_version']} (this host: {target.trt_version})")
    cuda = sidecar.get("tensorrt_cuda_major")
    if cuda is not None and target.trt_cuda_major is not None and cuda != target.trt_cuda_major:
        problems.append(f"a TensorRT build for CUDA {cuda} (this host's is for CUDA {target.trt_cuda_major})")
    level = settings.hardware_compatibility
    built_cc = sidecar.get("compute_capability")
    here_cc = target.to_dict()["compute_capability"]
    if level == "ampere_plus":
        if target.compute_capability < AMPERE:
            problems.append(f"an ampere_plus plan on {target.sm} (needs sm80+)")
    elif built_cc is not None and built_cc != here_cc:
        problems.append(f"compute capability {built_cc} (this device: {here_cc})")
    if level == "none" and sidecar.get("gpu_name") not in (None, target.gpu_name):
        problems.append(f"device {sidecar['gpu_name']!r} (this one: {target.gpu_name!r})")
    if not problems:
        return None
    return "built for " + ", ".join(problems)


def parse_key(key: str) -> dict[str, str] | None:
    """The fields of a key, or ``None`` if ``key`` is not an engine key."""
    match = _KEY_RE.match(key)
    return match.groupdict() if match else None


def detect_build_target(device_id: int = 0, trt_version: str | None = None,
                        trt_cuda_major: int | None = None) -> BuildTarget:
    """Compute capability and name of ``device_id`` (cuda-python), the TensorRT version and the
    CUDA major of its build.

    Initialises CUDA in the calling process: call it where the engine will run.
    ``trt_version`` / ``trt_cuda_major`` let a host without TensorRT compute the key
    it would need.
    """
    from . import cuda as cuda_rt
    from .runtime import tensorrt_cuda_major

    facts = cuda_rt.device_facts(device_id)
    if trt_version is None:
        from .runtime import trt_version as installed_version

        trt_version = installed_version()
    if trt_cuda_major is None:
        trt_cuda_major = tensorrt_cuda_major()
    return BuildTarget((facts.major, facts.minor), trt_version, facts.name, trt_cuda_major)
