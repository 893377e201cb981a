"""Reduced precision as ONNX graph transforms: one artifact for every runtime.

TensorRT 11 is strongly typed only (no ``BuilderFlag.FP16``, no calibrators),
so precision must live in the graph; the same graph then runs on TensorRT 10
and 11, on ONNX Runtime and on OpenVINO, and its drift against fp32 can be
measured on any CPU before an engine is ever built from it.

- ``fp16``: ``onnxconverter_common.float16.convert_float_to_float16`` with fp32
  inputs and outputs kept (engines and callers keep feeding float32).
- ``int8``: explicit Q/DQ nodes from ONNX Runtime static quantisation, calibrated
  on jittered real faces, on the inputs of the weighted layers only, symmetric, fp32
  biases (``int8_recipe``: the form TensorRT's explicit quantisation builds, which
  ONNX Runtime and OpenVINO also run). Mixed int8 by default: the weighted layers
  the sensitivity search (``int8_search``) finds the drift bound needs stay fp32
  (``quantization.keep_fp32: auto``; ``none``: every layer int8).

Converted graphs are cached next to the models, named by the source sha256,
the precision and a short hash of the *recipe*: every option that changes the
graph (quantiser settings, calibration set, the layers kept in fp32, converter
versions), so a fixed recipe never reuses a graph the old one wrote. Each graph has its own sha256
(which is what the TensorRT plan key hashes), and records the source's so that
the embedding contract stays that of the fp32 weights. How far a converted graph
drifts from its source is measured by ``drift_gate.conversion_drift``, not here.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from pathlib import Path
from typing import Any

from ..config.schema import QuantizationConfig
from ..errors import EngineError
from .int8_recipe import (
    INT8_EXTRA_OPTIONS,
    TENSORRT_DQ_INPUT_TYPES,
    WEIGHTED_OPS,
    calibration_cache,
    dequantize_input_problems,
    digest,
    int8_recipe,
    mixed_graph,
    quantize,
    version,
)
from .resolve import ResolvedModel, cache_root, file_sha256

logger = logging.getLogger(__name__)

CONVERTIBLE = ("fp16", "int8")
__all__ = ["CONVERTIBLE", "INT8_EXTRA_OPTIONS", "TENSORRT_DQ_INPUT_TYPES", "WEIGHTED_OPS",
           "conversion_recipe", "convert_model", "converted_path", "dequantize_input_problems",
           "int8_facts", "recipe_digest", "recipe_summary"]


def conversion_recipe(precision: str, quantization: QuantizationConfig | None = None,
                      keep_fp32: list[str] | tuple[str, ...] = ()) -> dict[str, Any]:
    """Everything that decides the bytes of a converted graph besides the source graph itself.

    The converter's version is part of it: a quantiser fix changes the graph, and a cached
    graph written by the old code must not be reused as if it were the new one. For int8,
    ``keep_fp32`` is the layers left unquantised (``int8_search`` finds them).
    """
    if precision == "fp16":
        return {"precision": "fp16", "converter": "onnxconverter_common.float16",
                "converter_version": version("onnxconverter-common"), "keep_io_types": True}
    if precision == "int8":
        return int8_recipe(quantization or QuantizationConfig(), keep_fp32)
    raise ValueError(f"cannot convert to {precision!r}; graph conversions: {list(CONVERTIBLE)}")


def recipe_digest(recipe: dict[str, Any]) -> str:
    """Eight hex digits of the recipe's canonical JSON: the part of the file name that says "how"."""
    return digest(recipe)


def resolved_recipe(model: ResolvedModel, precision: str, cache_dir: str | None,
                    quantization: QuantizationConfig | None = None) -> tuple[dict[str, Any], dict | None]:
    """The recipe ``model`` converts to ``precision`` with, and for mixed int8 the search behind
    it (``int8_search.find_keep_fp32``: measured once per model and settings, then cached)."""
    q = quantization or QuantizationConfig()
    if precision != "int8" or q.keep_fp32 == "none":
        return conversion_recipe(precision, q), None
    from .int8_search import find_keep_fp32

    search = find_keep_fp32(model, q, cache_dir)
    return conversion_recipe(precision, q, search["keep_fp32"]), search


def converted_path(model: ResolvedModel, precision: str, cache_dir: str | None,
                   recipe: dict[str, Any] | None = None) -> Path:
    """``<cache>/models/converted/{model}-{sha8}-{precision}-r{recipe8}.onnx`` (``recipe``: default
    ``conversion_recipe(precision)``, full int8)."""
    stem = model.model_id.replace("/", "_")
    recipe_hash = recipe_digest(recipe or conversion_recipe(precision))
    name = f"{stem}-{model.sha256[:8]}-{precision}-r{recipe_hash}.onnx"
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


def search_summary(search: dict[str, Any] | None) -> dict[str, Any]:
    """What the int8 graph's metadata and the bench report say of the search behind its recipe."""
    if search is None:
        return {"keep_fp32": "none: every weighted layer in int8"}
    return {key: search[key] for key in ("target_min_cosine", "search_faces", "sensitivity_faces",
                                         "measured_with", "layers", "order", "keep_fp32", "min_cosine",
                                         "mean_cosine", "full_int8", "int8_mac_share", "seconds")}


def int8_facts(path: str) -> dict[str, Any] | None:
    """The recipe and search summary an int8 graph carries in its ONNX metadata (``None`` for a
    graph without them): what ``arcface models`` and the bench report show."""
    import onnx

    props = {p.key: p.value for p in onnx.load(path, load_external_data=False).metadata_props}
    if props.get("arcface_ray.precision") != "int8" or "arcface_ray.recipe" not in props:
        return None
    recipe = json.loads(props["arcface_ray.recipe"])
    search = json.loads(props.get("arcface_ray.int8_search", "{}"))
    return {"recipe": recipe, "search": search, "summary": recipe_summary(recipe, search)}


def recipe_summary(recipe: dict[str, Any], search: dict[str, Any]) -> str:
    """One line: which layers stay fp32, the calibration, the placement and the search's bound."""
    method = recipe["calibrate_method"].lower()
    if "calibration_percentile" in recipe:
        method += f" {recipe['calibration_percentile']}"
    placement = "output Q/DQ" if "inputs and outputs" in recipe.get("qdq_placement", "") else "input Q/DQ"
    calibration = f"{method}, {recipe['calibration_size']} faces, {placement}"
    if "layers" not in search:
        return f"full int8 (every weighted layer), {calibration}"
    return (f"mixed: {len(recipe['keep_fp32'])}/{search['layers']} layers fp32 "
            f"({100 * search['int8_mac_share']:.0f}% of MACs int8), {calibration}; search bound "
            f"{search['target_min_cosine']} on {search['search_faces']} faces "
            f"(min {search['min_cosine']:.5f})")


def _to_int8(source: ResolvedModel, dest: Path, recipe: dict[str, Any], search: dict[str, Any] | None,
             quantization: QuantizationConfig, cache_dir: str | None) -> None:
    import onnx

    full = quantize(source, dest, recipe, calibration_cache(source, quantization, cache_dir))
    quantized = mixed_graph(full, onnx.load(source.path), recipe["keep_fp32"], source.model_id)
    method = recipe["calibrate_method"].lower()
    if "calibration_percentile" in recipe:
        method += f" {recipe['calibration_percentile']}"
    _stamp(
        quantized,
        source,
        "int8",
        {
            "arcface_ray.converter": "onnxruntime.quantization.quantize_static(QDQ, symmetric s8s8 on the "
            "inputs and outputs of Conv/Gemm, per-channel weights, fp32 biases, BatchNormalization "
            "unquantised)",
            "arcface_ray.calibration": f"{recipe['calibration_size']} jittered faces, seed "
            f"{recipe['calibration_seed']}, {method}",
            "arcface_ray.int8_keep_fp32": json.dumps(recipe["keep_fp32"]),
            "arcface_ray.int8_search": json.dumps(search_summary(search), sort_keys=True),
            "arcface_ray.recipe": json.dumps(recipe, sort_keys=True),
        },
    )
    onnx.save(quantized, str(dest))


def convert_model(
    model: ResolvedModel,
    precision: str,
    cache_dir: str | None = None,
    quantization: QuantizationConfig | None = None,
) -> ResolvedModel:
    """``model`` expressed in ``precision`` (``fp32`` returns it unchanged).

    Converts once per (source sha256, precision, recipe: ``resolved_recipe``)
    and caches the result; concurrent callers on one host wait on a file lock.
    ``quantization`` (default: the config's defaults) says how int8 is made.
    """
    if precision in ("fp32", model.precision):
        return model
    if precision not in CONVERTIBLE:
        raise ValueError(f"cannot convert to {precision!r}; graph conversions: {list(CONVERTIBLE)}")
    if model.precision != "fp32":
        raise ValueError(
            f"{model.model_id} is already {model.precision}; convert from the fp32 model instead"
        )
    q = quantization or QuantizationConfig()
    try:
        recipe, search = resolved_recipe(model, precision, cache_dir, q)
    except EngineError:
        raise
    except Exception as exc:
        raise EngineError(f"searching the int8 recipe of {model.model_id} failed: {exc}") from exc
    dest = converted_path(model, precision, cache_dir, recipe)
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
                        _to_int8(model, tmp, recipe, search, q, cache_dir)
                    os.replace(tmp, dest)
                except EngineError:
                    raise
                except Exception as exc:
                    raise EngineError(f"converting {model.model_id} to {precision} failed: {exc}") from exc
                finally:
                    tmp.unlink(missing_ok=True)
    return model.derived(dest, file_sha256(dest), precision)
