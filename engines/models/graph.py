"""Facts read from an ONNX graph without running it: input name, output dim, scaling, MACs.

Cheap (the graph is parsed, weights are not loaded as external data) and
memoised per (path, sha256), because every backend start and every model
resolution asks.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from functools import lru_cache

from ..base.preprocess import Normalization, detect_normalization
from ..errors import BackendUnavailable, ModelResolutionError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class GraphFacts:
    """What ``resolve_model`` records of a graph."""

    normalization: Normalization
    macs_per_face: int | None
    embedding_dim: int | None  # from the output shape, when static
    props: dict[str, str] = field(default_factory=dict)  # the model's metadata_props


@lru_cache(maxsize=64)
def graph_facts(path: str, sha256: str) -> GraphFacts:
    """The facts of the graph at ``path`` (``sha256`` keys the memo: a changed file is read again)."""
    import onnx

    try:
        model = onnx.load_model(path, load_external_data=False)
    except Exception as exc:
        raise ModelResolutionError(f"{path} is not a readable ONNX model: {exc}") from exc
    props = {p.key: p.value for p in model.metadata_props}
    norm = _recorded_normalization(props) or detect_normalization([n.name for n in model.graph.node])
    macs = props.get("arcface_ray.macs_per_face")
    if macs is None:
        try:
            macs = count_macs(model)
        except Exception as exc:  # MAC counting is informative only
            logger.debug("cannot count MACs of %s: %s", path, exc)
            macs = None
    dims = model.graph.output[0].type.tensor_type.shape.dim if model.graph.output else []
    dim = dims[-1].dim_value if dims and dims[-1].dim_value > 0 else None
    return GraphFacts(norm, int(macs) if macs is not None else None, dim, props)


NORMALIZATION_KEY = "arcface_ray.normalization"  # "mean,std,swap_rb" of a derived graph's source


def normalization_prop(norm: Normalization) -> str:
    return f"{norm.mean!r},{norm.std!r},{int(norm.swap_rb)}"


def _recorded_normalization(props: dict[str, str]) -> Normalization | None:
    """The source's scaling, recorded in a derived graph whose own first nodes would no longer
    tell it (the in-graph preprocessing puts a Cast and a Gather first)."""
    text = props.get(NORMALIZATION_KEY)
    if not text:
        return None
    try:
        mean, std, swap = text.split(",")
        return Normalization(float(mean), float(std), bool(int(swap)))
    except ValueError:
        logger.warning("ignoring unreadable %s=%r", NORMALIZATION_KEY, text)
        return None


def count_macs(model) -> int:
    """Multiply-accumulates per face of Conv / Gemm / MatMul nodes (batch 1).

    This is the figure arcface_torch and insightface publish as "GFLOPs".
    """
    return sum(layer_macs(model).values())


def layer_macs(model) -> dict[str, int]:
    """Multiply-accumulates per face of each Conv / Gemm / MatMul node with a constant weight, by
    node name (batch 1; the int8 search weighs layers by it)."""
    import onnx
    from onnx import shape_inference

    graph = model.graph
    inp = graph.input[0]
    dims = [d.dim_value or 1 for d in inp.type.tensor_type.shape.dim]
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    for d, v in zip(probe.graph.input[0].type.tensor_type.shape.dim, dims, strict=True):
        d.ClearField("dim_param")
        d.dim_value = v
    inferred = shape_inference.infer_shapes(probe)
    shapes = {}
    for vi in list(inferred.graph.value_info) + list(inferred.graph.output) + list(inferred.graph.input):
        shapes[vi.name] = [d.dim_value for d in vi.type.tensor_type.shape.dim]
    inits = {i.name: list(i.dims) for i in graph.initializer}
    macs: dict[str, int] = {}
    for node in graph.node:
        if node.op_type == "Conv":
            w = inits.get(node.input[1])
            out = shapes.get(node.output[0])
            if w and out and len(out) == 4:
                macs[node.name] = out[1] * out[2] * out[3] * w[1] * w[2] * w[3]
        elif node.op_type in ("Gemm", "MatMul"):
            w = inits.get(node.input[1])
            if w and len(w) == 2:
                macs[node.name] = w[0] * w[1]
    return macs


def graph_input_name(path: str) -> str:
    """The graph's one real input (initialisers listed as inputs in old exports excluded)."""
    import onnx

    graph = onnx.load_model(path, load_external_data=False).graph
    weights = {i.name for i in graph.initializer}
    names = [i.name for i in graph.input if i.name not in weights]
    if len(names) != 1:
        raise BackendUnavailable(f"{path}: expected one input, got {names}")
    return names[0]
