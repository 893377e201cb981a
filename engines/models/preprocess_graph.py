"""The preprocessing as ONNX nodes in front of a model: raw uint8 BGR crops in, embeddings out.

Why: every face used to become float32 NCHW in numpy before any runtime saw it
(``base.preprocess.to_blob``: a core per ~19k faces/s, and four times the bytes
to copy to a GPU). With the arithmetic in the graph the shells hand over the
``(N, 112, 112, 3)`` uint8 batch as it is; ONNX Runtime and OpenVINO fuse the
nodes into their first layer, TensorRT binds a uint8 input (a quarter of the
bytes over PCIe) and does the rest on the device.

The nodes repeat ``to_blob`` operation by operation, in float32: Cast to float,
Transpose to NCHW, BGR->RGB (a Gather of channels 2, 1, 0, only where the model
wants RGB), Sub mean, Mul 1/std (the model's own normalisation, MXNet-style 0/1
or arcface_torch-style 127.5/127.5, as ``resolve`` detected it), into the
model's original input. Same weights and the same numbers: the
derived graph keeps the source's contract (``derived_from_sha256``), and its
parity with the float path is tested (cosine >= 0.99999 on the eval faces).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from ..base.preprocess import NCHW_FLOAT, NHWC_UINT8
from ..errors import ModelResolutionError
from .graph import NORMALIZATION_KEY, graph_input_name, normalization_prop
from .resolve import INPUT_LAYOUT_KEY, ResolvedModel, build_once, cache_root, file_sha256

logger = logging.getLogger(__name__)

UINT8_INPUT_NAME = "faces_bgr_uint8"
# Bump when the nodes change: it is in the cached file's name, so no host reuses an older front.
GRAPH_VERSION = 1
_PREFIX = "arcface_ray_pre_"


def uint8_graph_path(model: ResolvedModel, cache_dir: str | None) -> Path:
    """Keyed by the graph it is built from (which already says its precision and conversion)."""
    stem = model.model_id.replace("/", "_")
    name = f"{stem}-{model.sha256[:8]}-{model.precision}-u8g{GRAPH_VERSION}.onnx"
    return cache_root(cache_dir) / "models" / "converted" / name


def _prepend(onnx_model, model: ResolvedModel) -> None:
    """Rewrite ``onnx_model`` in place: a uint8 NHWC input and the preprocessing nodes."""
    from onnx import TensorProto, helper, numpy_helper

    graph = onnx_model.graph
    original = graph_input_name(model.path)
    old = next(i for i in graph.input if i.name == original)
    dims = old.type.tensor_type.shape.dim
    if len(dims) != 4 or [d.dim_value for d in dims[1:]] != [3, 112, 112]:
        raise ModelResolutionError(
            f"{model.path}: in-graph preprocessing needs an input of shape (N, 3, 112, 112), got "
            f"{[d.dim_param or d.dim_value for d in dims]}"
        )
    batch = dims[0].dim_param or (dims[0].dim_value if dims[0].dim_value > 0 else "batch")
    norm = model.normalization
    graph.initializer.extend([
        numpy_helper.from_array(np.asarray(norm.mean, np.float32), f"{_PREFIX}mean"),
        numpy_helper.from_array(np.asarray(1.0 / norm.std, np.float32), f"{_PREFIX}scale"),
        numpy_helper.from_array(np.asarray([2, 1, 0], np.int64), f"{_PREFIX}bgr_to_rgb"),
    ])
    # Cast and Transpose first, so Sub and Mul stand right before the model's first layer, where
    # ONNX Runtime and OpenVINO fold a scale-shift into it (measured: the other order is slower)
    nodes = [
        helper.make_node("Cast", [UINT8_INPUT_NAME], [f"{_PREFIX}float"], to=TensorProto.FLOAT,
                         name=f"{_PREFIX}cast"),
        helper.make_node("Transpose", [f"{_PREFIX}float"], [f"{_PREFIX}nchw"], perm=[0, 3, 1, 2],
                         name=f"{_PREFIX}to_nchw"),
    ]
    channels = f"{_PREFIX}nchw"
    if norm.swap_rb:
        nodes.append(helper.make_node("Gather", [channels, f"{_PREFIX}bgr_to_rgb"], [f"{_PREFIX}rgb"],
                                      axis=1, name=f"{_PREFIX}swap_rb"))
        channels = f"{_PREFIX}rgb"
    nodes += [
        helper.make_node("Sub", [channels, f"{_PREFIX}mean"], [f"{_PREFIX}centered"],
                         name=f"{_PREFIX}sub_mean"),
        helper.make_node("Mul", [f"{_PREFIX}centered", f"{_PREFIX}scale"], [original],
                         name=f"{_PREFIX}mul_scale"),
    ]
    kept = [i for i in graph.input if i.name != original]
    del graph.input[:]
    crops = helper.make_tensor_value_info(UINT8_INPUT_NAME, TensorProto.UINT8, [batch, 112, 112, 3])
    graph.input.extend([crops, *kept])
    body = list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes + body)


def describe(model: ResolvedModel) -> str:
    """The nodes in words, for the graph's metadata and ``info``."""
    norm = model.normalization
    swap = "Gather(2,1,0) BGR->RGB, " if norm.swap_rb else ""
    return f"Cast uint8->float32, Transpose NHWC->NCHW, {swap}Sub {norm.mean:g}, Mul 1/{norm.std:g}"


def _write(model: ResolvedModel, dest: Path) -> None:
    import onnx
    from onnx import helper

    onnx_model = onnx.load(model.path)
    _prepend(onnx_model, model)
    props = {p.key: p.value for p in onnx_model.metadata_props}
    props.update({
        INPUT_LAYOUT_KEY: NHWC_UINT8,
        NORMALIZATION_KEY: normalization_prop(model.normalization),
        "arcface_ray.derived_from_sha256": model.contract_sha256,
        "arcface_ray.source_model_id": model.model_id,
        "arcface_ray.precision": model.precision,
        "arcface_ray.synthetic": "true" if model.synthetic else "false",
        "arcface_ray.preprocessing_in_graph": describe(model),
    })
    if model.arch:
        props["arcface_ray.arch"] = model.arch
    if model.macs_per_face:
        props["arcface_ray.macs_per_face"] = str(model.macs_per_face)
    del onnx_model.metadata_props[:]
    helper.set_model_props(onnx_model, props)
    onnx.checker.check_model(onnx_model)
    onnx.save(onnx_model, str(dest))


def with_uint8_input(model: ResolvedModel, cache_dir: str | None = None) -> ResolvedModel:
    """``model`` with its preprocessing in the graph (built once per host, cached beside the
    converted graphs); a graph that already takes uint8 crops is returned as it is."""
    if model.input_layout == NHWC_UINT8:
        return model
    if model.input_layout != NCHW_FLOAT:
        raise ModelResolutionError(f"{model.path}: unknown input layout {model.input_layout!r}")
    dest = uint8_graph_path(model, cache_dir)
    build_once(dest, lambda tmp: _write(model, tmp), f"preprocessing in the graph of {model.model_id}")
    return model.derived(dest, file_sha256(dest), model.precision, input_layout=NHWC_UINT8)
