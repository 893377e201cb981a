"""The int8 graph: where its Q/DQ nodes go, the quantiser call, and the checks on what it wrote.

One Q/DQ graph for every runtime (ONNX Runtime, OpenVINO, TensorRT's explicit
quantisation), so its form is the strictest of theirs:

- **Weighted layers** (``Conv``, ``Gemm``) are quantised: the activation they read
  and their weights, symmetric int8 (zero point 0, which TensorRT requires),
  weights per output channel; their output too where the runtime needs it
  (``quantization.quantize_outputs``, ``for_backend``): ONNX Runtime fuses
  ``DQ -> Conv -> Q`` into ``QLinearConv`` only with the output ``QuantizeLinear``
  (without it the layer runs in fp32 on dequantised values, slower than fp32),
  while OpenVINO and TensorRT run int8 from the inputs' Q/DQ alone, and every Q/DQ
  pair adds rounding noise (full int8 on the synthetic IResNet-50: min cosine 0.990
  with output Q/DQ, 0.995 without). Every other reader of a quantised tensor that no
  quantised layer wrote (a residual ``Add``, ``PRelu``) reads the float tensor, not
  its dequantised copy (``settle_qdq``).
- **Biases stay fp32** (``QuantizeBias: False``: ONNX Runtime's default puts int32
  biases behind a ``DequantizeLinear``, and TensorRT dequantizes int8 / fp8 / int4 /
  fp4 only) and BatchNormalization is never quantised (TensorRT's importer wants its
  parameters as constants). ``dequantize_input_problems`` checks the written graph.
- **Layers kept in fp32** (``keep_fp32``, found by ``int8_search``) read float
  inputs and their fp32 weights (``mixed_graph``): mixed int8. The final graph is
  made the way the search measured it (the full int8 graph, then ``mixed_graph``),
  so what the search measured is what runs.

Calibration runs once per (source graph, calibration settings) and its tensor ranges
are cached (ORT's ``calibration_cache_path``), so the sensitivity search and the final
graph quantise from the same ranges.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata as md
import io
import json
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from ..config.schema import QuantizationConfig
from ..errors import EngineError
from .resolve import ResolvedModel, cache_root

logger = logging.getLogger(__name__)

CALIBRATION_SEED = 20_000  # eval sets use small seeds; calibration must not see them
CALIBRATION_BATCH = 16
WEIGHTED_OPS = ("Conv", "Gemm")
# ONNX Runtime's extra_options: each one changes the graph, so each is in the recipe.
INT8_EXTRA_OPTIONS: dict[str, Any] = {
    "ActivationSymmetric": True,
    "WeightSymmetric": True,
    "QuantizeBias": False,
}
_METHODS = {"percentile": "Percentile", "minmax": "MinMax", "entropy": "Entropy"}
# TensorRT's DequantizeLinear accepts these inputs only (no int32, so no quantised biases).
TENSORRT_DQ_INPUT_TYPES = ("INT8", "FLOAT8E4M3FN", "INT4", "FLOAT4E2M1")


def version(dist: str) -> str:
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return "absent"


def calibration_recipe(q: QuantizationConfig) -> dict[str, Any]:
    """What decides the calibration ranges: method, its percentile, the faces, the calibrator."""
    recipe: dict[str, Any] = {
        "calibrate_method": _METHODS[q.calibration_method],
        "calibration_size": int(q.calibration_faces),
        "calibration_seed": CALIBRATION_SEED,
        "calibration_batch": CALIBRATION_BATCH,
        "calibrator_version": version("onnxruntime"),
    }
    if q.calibration_method == "percentile":
        recipe["calibration_percentile"] = float(q.calibration_percentile)
    return recipe


# runtimes whose int8 kernels need the weighted layers' outputs quantised (quantize_outputs: auto)
FUSES_OUTPUT_Q = ("onnx",)


def for_backend(q: QuantizationConfig, backend: str) -> QuantizationConfig:
    """``q`` with ``quantize_outputs: auto`` decided for ``backend``: ``always`` where the runtime
    fuses int8 layers only with their output Q (ONNX Runtime), else ``never`` (less noise)."""
    if q.quantize_outputs != "auto":
        return q
    return replace(q, quantize_outputs="always" if backend in FUSES_OUTPUT_Q else "never")


def outputs_quantized(q: QuantizationConfig) -> bool:
    """Whether the graph ``q`` describes has Q/DQ on weighted layers' outputs (``auto``: no)."""
    return q.quantize_outputs == "always"


def int8_recipe(q: QuantizationConfig, keep_fp32: Sequence[str] = ()) -> dict[str, Any]:
    """Everything that decides the bytes of the int8 graph besides the source graph itself.

    The quantiser's version is part of it: a quantiser fix changes the graph, and a cached
    graph written by the old code must not be reused as if it were the new one.
    """
    extra = dict(INT8_EXTRA_OPTIONS)
    if not outputs_quantized(q):
        extra["OpTypesToExcludeOutputQuantization"] = list(WEIGHTED_OPS)
    if q.calibration_method == "percentile":
        extra["CalibPercentile"] = float(q.calibration_percentile)
    return {
        "precision": "int8", "converter": "onnxruntime.quantization.quantize_static",
        "converter_version": version("onnxruntime"), "quant_format": "QDQ",
        "activation_type": "QInt8", "weight_type": "QInt8", "per_channel": True,
        **calibration_recipe(q),
        "op_types_to_quantize": list(WEIGHTED_OPS), "extra_options": extra,
        "qdq_placement": ("inputs and outputs" if outputs_quantized(q) else "inputs")
        + " of quantised weighted layers only (settle_qdq)",
        "keep_fp32": list(keep_fp32),
        "pre_process": "quant_pre_process(skip_symbolic_shape=True)",
    }


def digest(data: Any, length: int = 8) -> str:
    """Hex digits of ``data``'s canonical JSON: the part of a file name that says "how"."""
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:length]


def calibration_blobs(n: int, normalization) -> np.ndarray:
    """Normalised NCHW inputs for int8 calibration: jittered real faces (a seed no eval set uses)."""
    from ..base.preprocess import to_blob
    from .sample_faces import jittered_faces

    return to_blob(jittered_faces(n, seed=CALIBRATION_SEED).faces, normalization)


@contextlib.contextmanager
def _quiet_quantiser() -> Iterator[None]:
    """ORT's quantiser logs per-tensor chatter on the root logger and prints its calibrator's
    progress on stdout (which a ``--json`` caller parses): keep both out."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(max(level, logging.ERROR))
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        root.setLevel(level)


def calibration_cache(source: ResolvedModel, q: QuantizationConfig, cache_dir: str | None) -> Path:
    """Where the tensor ranges of ``source`` calibrated as ``q`` says are kept."""
    stem = source.model_id.replace("/", "_")
    name = f"{stem}-{source.sha256[:8]}-calibration-{digest(calibration_recipe(q))}.json"
    return cache_root(cache_dir) / "models" / "converted" / name


def quantize(source: ResolvedModel, dest: Path, recipe: dict[str, Any], ranges: Path) -> Any:
    """The full int8 Q/DQ ``onnx.ModelProto`` of ``source`` as ``recipe`` says, every weighted layer
    quantised (``recipe["keep_fp32"]`` is applied by ``mixed_graph``, not here); not saved: the
    caller makes it mixed and stamps it. ``dest`` is a scratch path the quantiser writes.

    ``ranges`` is the calibration cache: read when it exists, written otherwise.
    """
    import onnx
    import onnxruntime as ort
    from filelock import FileLock
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    step = recipe["calibration_batch"]

    class Faces(CalibrationDataReader):
        """Calibration batches, made only if the ranges are not cached yet."""

        def __init__(self) -> None:
            self._batches: Iterator[dict[str, np.ndarray]] | None = None

        def get_next(self):
            if self._batches is None:
                session = ort.InferenceSession(source.path, providers=["CPUExecutionProvider"])
                name = session.get_inputs()[0].name
                blobs = calibration_blobs(recipe["calibration_size"], source.normalization)
                self._batches = iter([{name: blobs[i : i + step]} for i in range(0, len(blobs), step)])
            return next(self._batches, None)

    ranges.parent.mkdir(parents=True, exist_ok=True)
    pre = dest.with_name(dest.stem + ".pre.onnx")
    with FileLock(str(ranges) + ".lock"):
        # ORT writes its cache in place; ours appears whole (renamed) or not at all
        written = ranges if ranges.is_file() else ranges.with_name(f".{ranges.stem}.{os.getpid()}.tmp.json")
        try:
            with _quiet_quantiser():
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
                    calibration_cache_path=str(written),
                )
            if written != ranges:
                os.replace(written, ranges)
        finally:
            pre.unlink(missing_ok=True)
            if written != ranges:
                written.unlink(missing_ok=True)
    return onnx.load(str(dest))


def mixed_graph(full, source, keep_fp32: Sequence[str], model_id: str = "model") -> Any:
    """The int8 graph with the layers ``keep_fp32`` in fp32 (``keep_float``) and the Q/DQ pairs
    settled (``settle_qdq``): what the search measures and what the converted file holds. Raises
    ``EngineError`` if it dequantizes anything TensorRT cannot."""
    out = keep_float(full, source, keep_fp32)
    settle_qdq(out)
    problems = dequantize_input_problems(out)
    if problems:
        raise EngineError(
            f"the int8 graph of {model_id} has {len(problems)} DequantizeLinear node(s) TensorRT "
            f"cannot build (it dequantizes {'/'.join(TENSORRT_DQ_INPUT_TYPES)} only): {problems[:3]}"
        )
    return out


def _producers(graph) -> dict[str, Any]:
    return {out: node for node in graph.node for out in node.output}


def weighted_layers(model) -> list[str]:
    """The weighted layers (``Conv`` / ``Gemm``) of a Q/DQ graph whose weights are quantised,
    in graph order."""
    producer = _producers(model.graph)
    layers = []
    for node in model.graph.node:
        if node.op_type in WEIGHTED_OPS and len(node.input) > 1:
            dq = producer.get(node.input[1])
            if dq is not None and dq.op_type == "DequantizeLinear":
                layers.append(node.name)
    return layers


def keep_float(model, source, names: Sequence[str]) -> Any:
    """A copy of the Q/DQ ``model`` in which the nodes ``names`` read float inputs and their
    fp32 weights (from ``source``, the fp32 graph), from the same ranges, without quantising again;
    an input a still-int8 layer wrote stays its dequantised copy (that layer's output Q is what
    ONNX Runtime fuses it with). Q/DQ nodes nobody reads any more are dropped."""
    import onnx

    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    producer = _producers(graph)
    have = {init.name for init in graph.initializer}
    fp32 = {init.name: init for init in source.graph.initializer}
    wanted = set(names)
    still_int8 = set(weighted_layers(out)) - wanted
    fused_outputs = {o for node in graph.node if node.name in still_int8 for o in node.output}
    for node in graph.node:
        if node.name not in wanted:
            continue
        for k, name in enumerate(node.input):
            dq = producer.get(name)
            if dq is None or dq.op_type != "DequantizeLinear":
                continue
            quantized = dq.input[0]
            if quantized in have:  # a weight: the fp32 original, by ORT's "<name>_quantized" naming
                original = quantized.removesuffix("_quantized")
                if original not in fp32:
                    raise EngineError(f"{node.name}: no fp32 weight {original!r} in the source graph")
                if original not in have:
                    graph.initializer.append(fp32[original])
                    have.add(original)
                node.input[k] = original
            elif producer[quantized].input[0] not in fused_outputs:  # an activation: what its Q read
                node.input[k] = producer[quantized].input[0]
            # else: an int8 layer wrote it, fused with that Q: this layer reads the dequantised copy
    _drop_unread(out)
    return out


def settle_qdq(model) -> int:
    """Point every reader of a dequantised copy at the float tensor itself, unless it is a quantised
    weighted layer (it needs the int8 input) or a quantised layer wrote the tensor (ONNX Runtime fuses
    that layer with its output ``QuantizeLinear`` only when the Q is its sole reader); Q/DQ nodes
    nobody reads any more are dropped. Returns how many inputs changed."""
    graph = model.graph
    producer = _producers(graph)
    quantized = set(weighted_layers(model))
    fused_outputs = {out for node in graph.node if node.name in quantized for out in node.output}
    changed = 0
    for node in graph.node:
        if node.name in quantized or node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            continue
        for k, name in enumerate(node.input):
            dq = producer.get(name)
            if dq is None or dq.op_type != "DequantizeLinear":
                continue
            q = producer.get(dq.input[0])
            if q is not None and q.op_type == "QuantizeLinear" and q.input[0] not in fused_outputs:
                node.input[k] = q.input[0]
                changed += 1
    _drop_unread(model)
    return changed


def _drop_unread(model) -> None:
    """Remove nodes whose outputs nobody reads, then initialisers nobody reads."""
    graph = model.graph
    outputs = {o.name for o in graph.output}
    while True:
        read = {name for node in graph.node for name in node.input} | outputs
        unread = [node for node in graph.node if not any(o in read for o in node.output)]
        if not unread:
            break
        for node in unread:
            graph.node.remove(node)
    read = {name for node in graph.node for name in node.input}
    kept = [init for init in graph.initializer if init.name in read]
    del graph.initializer[:]
    graph.initializer.extend(kept)


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
