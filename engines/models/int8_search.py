"""Which weighted layers int8 must leave in fp32, found by measurement (mixed int8).

Full int8 drifts past the gate on deep networks: every quantised layer adds its
rounding noise and the layers after it amplify it. The search finds the layers
that matter, in three steps on the fp32 source graph:

1. **Quantise every weighted layer** (``int8_recipe.quantize``, calibration as
   configured): the full int8 graph.
2. **Sensitivity, one layer at a time**: for each weighted layer, the graph with
   only that layer quantised (``int8_recipe.mixed_graph`` keeping all the others)
   embeds the first ``SENSITIVITY_FACES`` eval faces; its sensitivity is the mean
   of ``1 - cosine`` against fp32. Rounding noise from separate layers adds up
   (in variance), so the sum of the sensitivities predicts full int8's drift.
3. **Exclude in order of sensitivity** until the graph with the most sensitive
   ``k`` layers in fp32 reaches ``target_min_cosine`` (min over ``search_faces``
   eval faces, the drift gate's among them): the smallest such ``k``, by bisection
   (drift falls as layers leave int8).

Every measurement is on ONNX Runtime's CPU provider with graph optimisations off,
so each ``DequantizeLinear -> op -> QuantizeLinear`` runs as written, in fp32
arithmetic on the dequantised values: what an exact int8 kernel (VNNI, AMX,
TensorRT) computes, on any CPU, including those whose own int8 kernels saturate
(AVX2's ``vpmaddubsw``). The result is deterministic per source graph, settings and
ONNX Runtime version, and cached beside the converted graphs; the runtime drift
gate still judges the graph on the runtime that serves it.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from ..config.schema import QuantizationConfig
from .int8_recipe import (
    calibration_cache,
    calibration_recipe,
    digest,
    int8_recipe,
    mixed_graph,
    quantize,
    version,
    weighted_layers,
)
from .resolve import ResolvedModel, cache_root

logger = logging.getLogger(__name__)

SEARCH_VERSION = 1  # bump when the method (or the eval faces it reads) changes
SENSITIVITY_FACES = 16
SIMULATION = "onnxruntime CPU, graph optimisations off (Q/DQ as written: exact int8 arithmetic)"


def search_key(source: ResolvedModel, q: QuantizationConfig) -> dict[str, Any]:
    """What the search's answer depends on (its cache key)."""
    return {
        "source_sha256": source.sha256, "search_version": SEARCH_VERSION,
        "calibration": calibration_recipe(q), "placement": int8_recipe(q)["extra_options"],
        "target_min_cosine": q.target_min_cosine, "search_faces": q.search_faces,
        "sensitivity_faces": min(SENSITIVITY_FACES, q.search_faces), "onnxruntime": version("onnxruntime"),
    }


def search_path(source: ResolvedModel, q: QuantizationConfig, cache_dir: str | None) -> Path:
    stem = source.model_id.replace("/", "_")
    name = f"{stem}-{source.sha256[:8]}-int8-search-{digest(search_key(source, q))}.json"
    return cache_root(cache_dir) / "models" / "converted" / name


class _Simulator:
    """Embeds a fixed face set with Q/DQ graphs as exact int8 arithmetic, against fp32."""

    def __init__(self, source: ResolvedModel, faces: np.ndarray) -> None:
        from ..base.preprocess import to_blob

        self._blob = to_blob(faces, source.normalization)
        self.reference = self._embed(source.path)

    def _embed(self, model: Any) -> np.ndarray:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        options.log_severity_level = 3
        payload = model if isinstance(model, str) else model.SerializeToString()
        session = ort.InferenceSession(payload, options, providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        out = np.concatenate([session.run(None, {name: self._blob[i : i + 16]})[0]
                              for i in range(0, len(self._blob), 16)]).astype(np.float64)
        return out / np.linalg.norm(out, axis=1, keepdims=True)

    def cosines(self, model: Any, n: int | None = None) -> np.ndarray:
        """Per-face cosine to fp32 of ``model`` (a Q/DQ ``ModelProto``) on the first ``n`` faces."""
        blob, self._blob = self._blob, self._blob[:n]
        try:
            return (self.reference[: len(self._blob)] * self._embed(model)).sum(axis=1)
        finally:
            self._blob = blob


def _measure(sim: _Simulator, full: Any, source: Any, keep: list[str]) -> dict[str, float]:
    cos = sim.cosines(mixed_graph(full, source, keep))
    return {"min_cosine": float(cos.min()), "mean_cosine": float(cos.mean())}


def run_search(source: ResolvedModel, q: QuantizationConfig, cache_dir: str | None,
               progress: bool | None = None) -> dict[str, Any]:
    """Measure (no cache): the layers to keep in fp32 and every figure behind the choice."""
    import onnx
    from tqdm import tqdm

    from .graph import layer_macs
    from .sample_faces import eval_faces

    started = time.time()
    folder = cache_root(cache_dir) / "models" / "converted"
    folder.mkdir(parents=True, exist_ok=True)
    scratch = folder / f".{source.sha256[:8]}-int8-search.{os.getpid()}.tmp.onnx"
    try:
        full = quantize(source, scratch, int8_recipe(q), calibration_cache(source, q, cache_dir))
    finally:
        scratch.unlink(missing_ok=True)
    fp32 = onnx.load(source.path)
    macs = layer_macs(fp32)
    layers = weighted_layers(full)
    sim = _Simulator(source, eval_faces(q.search_faces))
    n_sens = min(SENSITIVITY_FACES, q.search_faces)
    sensitivity: dict[str, float] = {}
    for layer in tqdm(layers, desc=f"int8 sensitivity {source.model_id}", unit="layer",
                      disable=None if progress is None else not progress):
        alone = mixed_graph(full, fp32, [other for other in layers if other != layer])
        sensitivity[layer] = float(1.0 - sim.cosines(alone, n_sens).mean())
    order = sorted(layers, key=lambda name: (-sensitivity[name], layers.index(name)))
    steps: dict[int, dict[str, float]] = {}

    def passes(k: int) -> bool:
        if k not in steps:
            steps[k] = _measure(sim, full, fp32, order[:k])
            logger.info("int8 search %s: %d layer(s) in fp32 -> min cosine %.6f", source.model_id, k,
                        steps[k]["min_cosine"])
        return steps[k]["min_cosine"] >= q.target_min_cosine

    low, high = 0, len(order)  # invariant: high passes (all fp32 is the source itself); low is untested
    if passes(0):
        high = 0
    else:
        steps[high] = {"min_cosine": 1.0, "mean_cosine": 1.0}
        while high - low > 1:
            middle = (low + high) // 2
            if passes(middle):
                high = middle
            else:
                low = middle
    keep = order[:high]
    total = sum(macs.get(name, 0) for name in layers) or 1
    return {
        **search_key(source, q),
        "model_id": source.model_id,
        "measured_with": SIMULATION,
        "layers": len(layers),
        "keep_fp32": keep,
        "min_cosine": steps[high]["min_cosine"],
        "mean_cosine": steps[high]["mean_cosine"],
        "full_int8": steps.get(0) or _measure(sim, full, fp32, []),
        "int8_mac_share": round(1.0 - sum(macs.get(name, 0) for name in keep) / total, 4),
        "sensitivity": {name: sensitivity[name] for name in order},
        "macs": {name: macs.get(name, 0) for name in order},
        "steps": {str(k): v for k, v in sorted(steps.items())},
        "seconds": round(time.time() - started, 1),
    }


def find_keep_fp32(source: ResolvedModel, q: QuantizationConfig, cache_dir: str | None) -> dict[str, Any]:
    """The search's answer for ``source`` under ``q``: read from the cache, else measured once per
    host (a file lock: concurrent starts wait for the first) and cached."""
    path = search_path(source, q, cache_dir)
    cached = _read(path)
    if cached is not None:
        return cached
    from filelock import FileLock

    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock"):
        cached = _read(path)
        if cached is not None:
            return cached
        logger.info("int8: searching which layers of %s stay fp32 (once per model and settings)",
                    source.model_id)
        result = run_search(source, q, cache_dir)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(result, indent=1))
        os.replace(tmp, path)
        logger.info("int8 %s: %d of %d weighted layers in fp32 (%.0f%% of MACs in int8), min cosine %.6f "
                    "on %d faces, %.0f s", source.model_id, len(result["keep_fp32"]), result["layers"],
                    100 * result["int8_mac_share"], result["min_cosine"], q.search_faces, result["seconds"])
        return result


def _read(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None
