"""Reduced precision as ONNX graph transforms: one artifact for every runtime.

TensorRT 11 is strongly typed only (no ``BuilderFlag.FP16``, no calibrators),
so precision must live in the graph; the same graph then runs on TensorRT 10
and 11, on ONNX Runtime and on OpenVINO, and its drift against fp32 can be
measured on any CPU before an engine is ever built from it.

- ``fp16``: ``onnxconverter_common.float16.convert_float_to_float16`` with fp32
  inputs and outputs kept (engines and callers keep feeding float32).
- ``int8``: explicit Q/DQ nodes from ONNX Runtime static quantisation,
  calibrated on jittered real faces (a seed disjoint from the eval set's).
  Symmetric int8 for activations and weights, per-channel weights: the form
  TensorRT's explicit quantisation requires (zero point 0), which ONNX Runtime
  and OpenVINO also run.

Converted graphs are cached next to the models, keyed by the source sha256 and
the settings; each has its own sha256, and records the source's so that the
embedding contract stays that of the fp32 weights. How far a converted graph
drifts from its source is measured by ``drift_gate.conversion_drift``, not here.
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from ..errors import EngineError
from .resolve import ResolvedModel, cache_root, file_sha256

logger = logging.getLogger(__name__)

CONVERTIBLE = ("fp16", "int8")
CALIBRATION_SEED = 20_000  # eval sets use small seeds; calibration must not see them
INT8_PERCENTILE = 99.999


@contextlib.contextmanager
def _quiet_root_logger() -> Iterator[None]:
    """ORT's quantiser logs per-tensor chatter on the root logger; keep ours readable."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(max(level, logging.ERROR))
    try:
        yield
    finally:
        root.setLevel(level)


def converted_path(model: ResolvedModel, precision: str, cache_dir: str | None, calib: int) -> Path:
    stem = model.model_id.replace("/", "_")
    suffix = f"-c{calib}" if precision == "int8" else ""
    name = f"{stem}-{model.sha256[:8]}-{precision}{suffix}.onnx"
    return cache_root(cache_dir) / "models" / "converted" / name


def _stamp(onnx_model, source: ResolvedModel, precision: str, extra: dict[str, str]) -> None:
    from onnx import helper

    props = {p.key: p.value for p in onnx_model.metadata_props}
    props.update(
        {
            "arcface_ray.precision": precision,
            "arcface_ray.derived_from_sha256": source.contract_sha256,
            "arcface_ray.source_model_id": source.model_id,
            "arcface_ray.synthetic": "true" if source.synthetic else "false",
            **extra,
        }
    )
    if source.arch:
        props["arcface_ray.arch"] = source.arch
    if source.macs_per_face:
        props["arcface_ray.macs_per_face"] = str(source.macs_per_face)
    del onnx_model.metadata_props[:]
    helper.set_model_props(onnx_model, props)


def _to_fp16(source: ResolvedModel, dest: Path) -> None:
    import onnx
    from onnxconverter_common import float16

    model = onnx.load(source.path)
    with warnings.catch_warnings():
        # one warning per tiny weight flushed to fp16's smallest subnormal: expected
        warnings.simplefilter("ignore", UserWarning)
        converted = float16.convert_float_to_float16(model, keep_io_types=True)
    _stamp(converted, source, "fp16", {"arcface_ray.converter": "onnxconverter_common.float16"})
    onnx.save(converted, str(dest))


def calibration_blobs(n: int, normalization) -> np.ndarray:
    """Normalised NCHW inputs for int8 calibration: jittered real faces."""
    from ..base.preprocess import to_blob
    from .sample_faces import jittered_faces

    return to_blob(jittered_faces(n, seed=CALIBRATION_SEED).faces, normalization)


def _to_int8(source: ResolvedModel, dest: Path, calibration_size: int) -> None:
    import onnx
    import onnxruntime as ort
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    input_name = ort.InferenceSession(source.path, providers=["CPUExecutionProvider"]).get_inputs()[0].name
    blobs = calibration_blobs(calibration_size, source.normalization)

    class Faces(CalibrationDataReader):
        def __init__(self) -> None:
            self._batches = iter(
                [{input_name: blobs[i : i + 16]} for i in range(0, len(blobs), 16)]
            )

        def get_next(self):
            return next(self._batches, None)

    pre = dest.with_name(dest.stem + ".pre.onnx")
    try:
        with _quiet_root_logger():
            quant_pre_process(source.path, str(pre), skip_symbolic_shape=True)
            quantize_static(
                str(pre),
                str(dest),
                Faces(),
                quant_format=QuantFormat.QDQ,
                activation_type=QuantType.QInt8,
                weight_type=QuantType.QInt8,
                per_channel=True,
                calibrate_method=CalibrationMethod.Percentile,
                extra_options={
                    "ActivationSymmetric": True,
                    "WeightSymmetric": True,
                    "CalibPercentile": INT8_PERCENTILE,
                },
            )
    finally:
        pre.unlink(missing_ok=True)
    quantized = onnx.load(str(dest))
    _stamp(
        quantized,
        source,
        "int8",
        {
            "arcface_ray.converter": "onnxruntime.quantization.quantize_static(QDQ, symmetric s8s8)",
            "arcface_ray.calibration": f"{calibration_size} jittered faces, seed {CALIBRATION_SEED}, "
            f"percentile {INT8_PERCENTILE}",
        },
    )
    onnx.save(quantized, str(dest))


def convert_model(
    model: ResolvedModel,
    precision: str,
    cache_dir: str | None = None,
    calibration_size: int = 64,
) -> ResolvedModel:
    """``model`` expressed in ``precision`` (``fp32`` returns it unchanged).

    Converts once per (source sha256, precision, calibration size) and caches
    the result; concurrent callers on one host wait on a file lock.
    """
    if precision in ("fp32", model.precision):
        return model
    if precision not in CONVERTIBLE:
        raise ValueError(f"cannot convert to {precision!r}; graph conversions: {list(CONVERTIBLE)}")
    if model.precision != "fp32":
        raise ValueError(
            f"{model.model_id} is already {model.precision}; convert from the fp32 model instead"
        )
    dest = converted_path(model, precision, cache_dir, calibration_size)
    if not dest.exists():
        from filelock import FileLock

        dest.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(dest) + ".lock"):
            if not dest.exists():
                tmp = dest.with_name(f".{dest.stem}.{os.getpid()}.tmp.onnx")
                logger.info("converting %s to %s -> %s", model.model_id, precision, dest)
                try:
                    if precision == "fp16":
                        _to_fp16(model, tmp)
                    else:
                        _to_int8(model, tmp, calibration_size)
                    os.replace(tmp, dest)
                except EngineError:
                    raise
                except Exception as exc:
                    raise EngineError(f"converting {model.model_id} to {precision} failed: {exc}") from exc
                finally:
                    tmp.unlink(missing_ok=True)
    return model.derived(dest, file_sha256(dest), precision)
