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
  and OpenVINO also run. Weights and activations only: biases stay fp32
  (``QuantizeBias: False``; ORT's default quantises them to int32 behind a
  ``DequantizeLinear``, and TensorRT's dequantize takes int8 / fp8 / int4 / fp4
  only, so such a graph never builds on TensorRT 10 or 11), and
  BatchNormalization is not quantised (TensorRT's ONNX importer wants its
  scale / bias / mean / variance as constants, not behind a dequantize).

Converted graphs are cached next to the models, named by the source sha256,
the precision and a short hash of the *recipe*: every option that changes the
graph (quantiser settings, calibration set, converter versions), so a fixed
recipe never reuses a graph the old one wrote. Each graph has its own sha256
(which is what the TensorRT plan key hashes), and records the source's so that
the embedding contract stays that of the fp32 weights. How far a converted graph
drifts from its source is measured by ``drift_gate.conversion_drift``, not here.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata as md
import json
import logging
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import EngineError
from .resolve import ResolvedModel, cache_root, file_sha256

logger = logging.getLogger(__name__)

CONVERTIBLE = ("fp16", "int8")
CALIBRATION_SEED = 20_000  # eval sets use small seeds; calibration must not see them
INT8_PERCENTILE = 99.999
# The op types ONNX Runtime quantises by default, less BatchNormalization (see above).
INT8_OP_TYPES = ("Add", "AveragePool", "Clip", "Concat", "Conv", "Flatten", "Gemm", "GlobalAveragePool",
                 "MatMul", "MaxPool", "Mul", "Relu", "Reshape", "Transpose")
# ONNX Runtime's extra_options for int8: each one changes the graph, so each is in the recipe.
INT8_EXTRA_OPTIONS: dict[str, Any] = {
    "ActivationSymmetric": True,
    "WeightSymmetric": True,
    "CalibPercentile": INT8_PERCENTILE,
    "QuantizeBias": False,
}
# TensorRT's DequantizeLinear accepts these inputs only (no int32, so no quantised biases).
TENSORRT_DQ_INPUT_TYPES = ("INT8", "FLOAT8E4M3FN", "INT4", "FLOAT4E2M1")


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


def _version(dist: str) -> str:
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return "absent"


def conversion_recipe(precision: str, calibration_size: int = 64) -> dict[str, Any]:
    """Everything that decides the bytes of a converted graph besides the source graph itself.

    The converter's version is part of it: a quantiser fix changes the graph, and a
    cached graph written by the old code must not be reused as if it were the new one.
    """
    if precision == "fp16":
        return {"precision": "fp16", "converter": "onnxconverter_common.float16",
                "converter_version": _version("onnxconverter-common"), "keep_io_types": True}
    if precision == "int8":
        return {
            "precision": "int8", "converter": "onnxruntime.quantization.quantize_static",
            "converter_version": _version("onnxruntime"), "quant_format": "QDQ",
            "activation_type": "QInt8", "weight_type": "QInt8", "per_channel": True,
            "calibrate_method": "Percentile", "calibration_size": int(calibration_size),
            "calibration_seed": CALIBRATION_SEED, "calibration_batch": 16,
            "op_types_to_quantize": list(INT8_OP_TYPES), "extra_options": dict(INT8_EXTRA_OPTIONS),
            "pre_process": "quant_pre_process(skip_symbolic_shape=True)",
        }
    raise ValueError(f"cannot convert to {precision!r}; graph conversions: {list(CONVERTIBLE)}")


def recipe_digest(recipe: dict[str, Any]) -> str:
    """Eight hex digits of the recipe's canonical JSON: the part of the file name that says "how"."""
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:8]


def converted_path(model: ResolvedModel, precision: str, cache_dir: str | None,
                   calibration_size: int = 64) -> Path:
    """``<cache>/models/converted/{model}-{sha8}-{precision}-r{recipe8}.onnx``."""
    stem = model.model_id.replace("/", "_")
    digest = recipe_digest(conversion_recipe(precision, calibration_size))
    name = f"{stem}-{model.sha256[:8]}-{precision}-r{digest}.onnx"
    return cache_root(cache_dir) / "models" / "converted" / name


def dequantize_input_problems(onnx_model) -> list[str]:
    """``DequantizeLinear`` nodes whose quantised input TensorRT cannot dequantize.

    An input is an initializer (its stored type) or a ``QuantizeLinear`` output
    (the type of that node's zero point, int8 when absent). Empty means the
    Q/DQ structure is one TensorRT's explicit quantisation accepts.
    """
    from onnx import TensorProto

    graph = onnx_model.graph
    types = {i.name: TensorProto.DataType.Name(i.data_type) for i in graph.initializer}
    for node in graph.node:
        if node.op_type == "QuantizeLinear":
            zero_point = node.input[2] if len(node.input) > 2 and node.input[2] else None
            types[node.output[0]] = types.get(zero_point, "INT8") if zero_point else "INT8"
    problems = []
    for node in graph.node:
        if node.op_type == "DequantizeLinear":
            kind = types.get(node.input[0], "unknown")
            if kind not in TENSORRT_DQ_INPUT_TYPES:
                problems.append(f"{node.name or node.output[0]}: dequantizes {node.input[0]} of type {kind}")
    return problems


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


def _to_fp16(source: ResolvedModel, dest: Path, recipe: dict[str, Any]) -> None:
    import onnx
    from onnxconverter_common import float16

    model = onnx.load(source.path)
    with warnings.catch_warnings():
        # one warning per tiny weight flushed to fp16's smallest subnormal: expected
        warnings.simplefilter("ignore", UserWarning)
        converted = float16.convert_float_to_float16(model, keep_io_types=recipe["keep_io_types"])
    _stamp(converted, source, "fp16", {"arcface_ray.converter": "onnxconverter_common.float16",
                                       "arcface_ray.recipe": json.dumps(recipe, sort_keys=True)})
    onnx.save(converted, str(dest))


def calibration_blobs(n: int, normalization) -> np.ndarray:
    """Normalised NCHW inputs for int8 calibration: jittered real faces."""
    from ..base.preprocess import to_blob
    from .sample_faces import jittered_faces

    return to_blob(jittered_faces(n, seed=CALIBRATION_SEED).faces, normalization)


def _to_int8(source: ResolvedModel, dest: Path, recipe: dict[str, Any]) -> None:
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
    calibration_size, step = recipe["calibration_size"], recipe["calibration_batch"]
    blobs = calibration_blobs(calibration_size, source.normalization)

    class Faces(CalibrationDataReader):
        def __init__(self) -> None:
            self._batches = iter(
                [{input_name: blobs[i : i + step]} for i in range(0, len(blobs), step)]
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
                quant_format=getattr(QuantFormat, recipe["quant_format"]),
                activation_type=getattr(QuantType, recipe["activation_type"]),
                weight_type=getattr(QuantType, recipe["weight_type"]),
                per_channel=recipe["per_channel"],
                calibrate_method=getattr(CalibrationMethod, recipe["calibrate_method"]),
                op_types_to_quantize=list(recipe["op_types_to_quantize"]),
                extra_options=dict(recipe["extra_options"]),
            )
    finally:
        pre.unlink(missing_ok=True)
    quantized = onnx.load(str(dest))
    problems = dequantize_input_problems(quantized)
    if problems:
        raise EngineError(
            f"the int8 graph of {source.model_id} has {len(problems)} DequantizeLinear node(s) TensorRT "
            f"cannot build (it dequantizes {'/'.join(TENSORRT_DQ_INPUT_TYPES)} only): {problems[:3]}"
        )
    _stamp(
        quantized,
        source,
        "int8",
        {
            "arcface_ray.converter": "onnxruntime.quantization.quantize_static(QDQ, symmetric s8s8, "
            "fp32 biases, BatchNormalization unquantised)",
            "arcface_ray.calibration": f"{calibration_size} jittered faces, seed {CALIBRATION_SEED}, "
            f"percentile {INT8_PERCENTILE}",
            "arcface_ray.recipe": json.dumps(recipe, sort_keys=True),
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

    Converts once per (source sha256, precision, recipe: ``conversion_recipe``)
    and caches the result; concurrent callers on one host wait on a file lock.
    """
    if precision in ("fp32", model.precision):
        return model
    if precision not in CONVERTIBLE:
        raise ValueError(f"cannot convert to {precision!r}; graph conversions: {list(CONVERTIBLE)}")
    if model.precision != "fp32":
        raise ValueError(
            f"{model.model_id} is already {model.precision}; convert from the fp32 model instead"
        )
    recipe = conversion_recipe(precision, calibration_size)
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
                        _to_fp16(model, tmp, recipe)
                    else:
                        _to_int8(model, tmp, recipe)
                    os.replace(tmp, dest)
                except EngineError:
                    raise
                except Exception as exc:
                    raise EngineError(f"converting {model.model_id} to {precision} failed: {exc}") from exc
                finally:
                    tmp.unlink(missing_ok=True)
    return model.derived(dest, file_sha256(dest), precision)
