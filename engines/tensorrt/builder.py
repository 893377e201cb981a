"""ONNX graph -> serialized TensorRT engine (a plan file). The real default build step.

Written once for TensorRT 10 and 11 (shared/research/tensorrt-api.md §1-2):

- ``builder.create_network(0)``: never ``EXPLICIT_BATCH`` (ignored in 10,
  removed in 11). TensorRT 11 is strongly typed only, so precision comes from
  the graph: ``precision.convert_model`` already wrote the fp16 graph (fp32
  I/O) or the int8 Q/DQ graph this builder parses.
- On TensorRT 10 (weakly typed), the FP16 / INT8 builder flags still exist and
  are set for fp16 / int8 graphs, feature-detected with ``hasattr`` (the flags
  are gone in 11; guessing by version number is how fp16 silently became fp32
  elsewhere, rf-detr#1453).
- fp32 builds clear TF32 so "fp32" means fp32 (the parity gate is 0.9999).
- One optimization profile: min / opt / max batch; other dynamic dims get 3x112x112.
- Workspace via ``set_memory_pool_limit``; a timing cache persisted per
  (TensorRT build, GPU) next to the engines; optional hardware compatibility.
  A timing cache TensorRT cannot read (another build wrote it, a torn write)
  is set aside and the build goes on with an empty one, or with none at all:
  a cache is a speed-up, never a reason for a build to fail.
- ``profiling_verbosity = DETAILED``, so the engine inspector can report each
  layer's precision (the check that an fp16 engine computes in fp16).

The builder is used by one thread at a time (a TensorRT rule); the engine
cache calls it under its build lock.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import EngineBuildError
from .plan_key import BuildSettings, BuildTarget
from .runtime import import_tensorrt, trt_logger

logger = logging.getLogger(__name__)

_HW_COMPAT = {
    "none": "NONE",
    "ampere_plus": "AMPERE_PLUS",
    "same_compute_capability": "SAME_COMPUTE_CAPABILITY",
}
_FACE_DIMS = (3, 112, 112)


@dataclass(frozen=True)
class BuildJob:
    """Everything a build step needs; it writes the plan to ``output_path``."""

    key: str
    onnx_path: str
    settings: BuildSettings
    target: BuildTarget
    output_path: Path
    timing_cache_path: Path | None = None
    device_id: int = 0


def _parse(trt: Any, builder: Any, onnx_path: str) -> tuple[Any, Any]:
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, trt_logger())
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise EngineBuildError(
            f"TensorRT {trt.__version__} cannot parse {onnx_path} ({len(errors)} error(s)):\n  "
            + "\n  ".join(errors or ["(the parser reported no details)"])
        )
    return network, parser


def _profile(builder: Any, network: Any, settings: BuildSettings) -> Any:
    if network.num_inputs != 1:
        names = [network.get_input(i).name for i in range(network.num_inputs)]
        raise EngineBuildError(f"an ArcFace graph has one input ((N,3,112,112) float or (N,112,112,3) "
                               f"uint8); this one has {names}")
    inp = network.get_input(0)
    shape = tuple(inp.shape)
    if len(shape) != 4:
        raise EngineBuildError(f"input {inp.name!r} has shape {shape}; expected (N, 3, 112, 112) or "
                               "(N, 112, 112, 3)")
    if shape[0] != -1:
        raise EngineBuildError(
            f"input {inp.name!r} has a fixed batch of {shape[0]}; the engine needs a dynamic batch "
            "axis (re-export the ONNX with dynamic axis 0, as the synthetic and insightface models have)"
        )
    face = (112, 112, 3) if shape[-1] == 3 else _FACE_DIMS  # uint8 NHWC crops or float NCHW blobs
    rest = tuple(face[i] if d == -1 else d for i, d in enumerate(shape[1:]))
    profile = builder.create_optimization_profile()
    profile.set_shape(
        inp.name,
        (settings.min_batch, *rest),
        (settings.opt_batch, *rest),
        (settings.max_batch, *rest),
    )
    return profile


def _precision_flags(trt: Any, config: Any, precision: str) -> list[str]:
    """Flags for TensorRT 10's weak typing; on 11 the graph alone decides (flags are gone)."""
    used = []
    flags = trt.BuilderFlag
    if precision == "fp32" and hasattr(flags, "TF32"):
        config.clear_flag(flags.TF32)
        used.append("-TF32")
    if precision == "fp16" and hasattr(flags, "FP16"):
        config.set_flag(flags.FP16)
        used.append("FP16")
    if precision == "int8" and hasattr(flags, "INT8"):
        config.set_flag(flags.INT8)  # Q/DQ graph: explicit quantization, no calibrator
        used.append("INT8")
    return used


def _attach_timing_cache(config: Any, blob: bytes) -> Any | None:
    """The cache made from ``blob`` once ``config`` accepted it, else None.

    TensorRT answers an unreadable blob with None (``createTimingCache`` returns
    nullptr) or a refusal from ``set_timing_cache`` (False), depending on what is
    wrong; a C++ exception surfaces as RuntimeError. None must never reach
    ``set_timing_cache``: its ``cache`` parameter is not optional (a TypeError).
    """
    try:
        cache = config.create_timing_cache(blob)
        if cache is not None and config.set_timing_cache(cache, ignore_mismatch=False):
            return cache
    except RuntimeError as exc:
        logger.warning("TensorRT refused a timing cache: %s", exc)
    return None


def _load_timing_cache(config: Any, path: Path | None) -> Any | None:
    """Attach the timing cache at ``path`` (empty if absent); returns the attached cache or None.

    A file TensorRT cannot use is renamed ``*.rejected`` (kept for a look, never
    read again) and the build starts an empty cache; if even that is refused the
    build runs without one.
    """
    if path is None:
        return None
    try:
        blob = path.read_bytes() if path.exists() else b""
    except OSError as exc:
        logger.warning("timing cache %s unreadable (%s); starting an empty one", path, exc)
        blob = b""
    if blob:
        cache = _attach_timing_cache(config, blob)
        if cache is not None:
            return cache
        rejected = path.with_name(path.name + ".rejected")
        logger.warning("timing cache %s (%d bytes) rejected by TensorRT; set aside as %s, starting an "
                       "empty one", path, len(blob), rejected.name)
        try:
            os.replace(path, rejected)
        except OSError as exc:
            logger.warning("could not set %s aside: %s", path, exc)
    cache = _attach_timing_cache(config, b"")
    if cache is None:
        logger.warning("TensorRT refused even an empty timing cache; building without one")
    return cache


def _save_timing_cache(config: Any, path: Path) -> None:
    data = config.get_timing_cache().serialize()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
    os.replace(tmp, path)


def build_plan(job: BuildJob) -> dict[str, Any]:
    """Build ``job.onnx_path`` into ``job.output_path``; returns facts for the sidecar.

    Raises ``EngineBuildError`` naming every parser error, or the builder's
    refusal (``build_serialized_network`` returned ``None``: see the TensorRT
    log lines above it on stderr).
    """
    trt = import_tensorrt("building a TensorRT engine")
    from . import cuda as cuda_rt

    cuda_rt.set_device(job.device_id)
    settings = job.settings
    started = time.perf_counter()
    builder = trt.Builder(trt_logger())
    network, _parser = _parse(trt, builder, job.onnx_path)
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, settings.workspace_mb << 20)
    config.add_optimization_profile(_profile(builder, network, settings))
    flags = _precision_flags(trt, config, settings.precision)
    level = _HW_COMPAT[settings.hardware_compatibility]
    if level != "NONE":
        config.hardware_compatibility_level = getattr(trt.HardwareCompatibilityLevel, level)
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED  # layer precisions for the inspector
    timing_path = job.timing_cache_path if settings.timing_cache else None
    timing = _load_timing_cache(config, timing_path)
    logger.info(
        "building TensorRT %s engine from %s (%s, profile %d/%d/%d, workspace %d MiB, flags %s)",
        trt.__version__, job.onnx_path, settings.precision, settings.min_batch, settings.opt_batch,
        settings.max_batch, settings.workspace_mb, flags or "none",
    )
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise EngineBuildError(
            f"TensorRT {trt.__version__} could not build {job.onnx_path} for {job.target.sm} "
            f"({settings.precision}); build_serialized_network returned None, see the TensorRT "
            "errors logged above"
        )
    job.output_path.parent.mkdir(parents=True, exist_ok=True)
    with open(job.output_path, "wb") as fh:
        fh.write(plan)  # IHostMemory supports the buffer protocol
    if timing_path is not None and timing is not None:
        _save_timing_cache(config, timing_path)
    seconds = time.perf_counter() - started
    logger.info("built %s in %.1f s (%.1f MiB)", job.output_path.name, seconds,
                job.output_path.stat().st_size / 2**20)
    return {"build_seconds": round(seconds, 3), "builder_flags": flags,
            "network_input": network.get_input(0).name, "timing_cache": timing is not None,
            "profiling_verbosity": "detailed"}


def parse_only(onnx_path: str) -> dict[str, Any]:
    """Parse ``onnx_path`` with TensorRT's ONNX parser and describe the network; builds nothing.

    Seconds, not minutes: what ``make gpu-check`` runs on the fp32 / fp16 / int8
    graphs to show that this TensorRT accepts them and which I/O dtypes they have.
    Raises ``EngineBuildError`` with every parser error.
    """
    trt = import_tensorrt("parsing an ONNX graph with TensorRT")
    builder = trt.Builder(trt_logger())
    network, _parser = _parse(trt, builder, onnx_path)

    def tensor(t: Any) -> dict[str, Any]:
        return {"name": t.name, "dtype": str(t.dtype).rsplit(".", 1)[-1], "shape": list(t.shape)}

    kinds: dict[str, int] = {}
    for i in range(network.num_layers):
        kind = str(network.get_layer(i).type).rsplit(".", 1)[-1]
        kinds[kind] = kinds.get(kind, 0) + 1
    return {
        "tensorrt_version": trt.__version__,
        "inputs": [tensor(network.get_input(i)) for i in range(network.num_inputs)],
        "outputs": [tensor(network.get_output(i)) for i in range(network.num_outputs)],
        "layers": network.num_layers,
        "layer_types": dict(sorted(kinds.items())),
    }
