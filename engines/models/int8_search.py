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
3. **Exclude in order of sensitivity** until the graph with the first ``k`` layers
   of the order in fp32 reaches ``target_min_cosine`` (min over ``search_faces``
   eval faces, the drift gate's among them): the smallest such ``k``, by bisection
   (drift falls as layers leave int8). Two orders are tried: most sensitive first
   (fewest layers in fp32) and most sensitive per multiply-accumulate first (a
   greedy knapsack: cheap, noisy layers leave int8 first, so more of the work stays
   in int8); the one leaving the larger share of MACs in int8 wins. The second is
   searched only up to the ``k`` where it would still beat the first (one step
   when it cannot).

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


def _measure(sim: _Simulator, full: Any, source: Any, keep: list[str], screen: int | None = None,
             bound: float | None = None) -> dict[str, float]:
    """Min / mean cosine to fp32 of the graph with ``keep`` in fp32. With ``screen`` and ``bound``:
    on the first ``screen`` faces first, and where their min is already below ``bound`` that is the
    answer (a subset's min is never below the whole set's: the verdict is the same, at a fraction
    of the cost; ``faces`` says how many were embedded)."""
    graph = mixed_graph(full, source, keep)
    if screen and bound is not None:
        cos = sim.cosines(graph, screen)
        if cos.min() < bound:
            return {"min_cosine": float(cos.min()), "mean_cosine": float(cos.mean()), "faces": len(cos)}
    cos = sim.cosines(graph)
    return {"min_cosine": float(cos.min()), "mean_cosine": float(cos.mean()), "faces": len(cos)}


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
    total = sum(macs.get(name, 0) for name in layers) or 1
    steps: dict[tuple[str, int], dict[str, float]] = {}
    def per_mac(name: str) -> float:
        return sensitivity[name] / max(macs.get(name, 0), 1)

    orders = {
        # most sensitive first: the fewest layers in fp32
        "sensitivity": sorted(layers, key=lambda name: (-sensitivity[name], layers.index(name))),
        # most sensitive per multiply-accumulate first: the most MACs left in int8 (greedy knapsack)
        "sensitivity_per_mac": sorted(layers, key=lambda name: (-per_mac(name), layers.index(name))),
    }
    def share(keep: list[str]) -> float:
        return round(1.0 - sum(macs.get(name, 0) for name in keep) / total, 4)

    choices: dict[str, dict[str, Any]] = {}
    for label, order in orders.items():
        def passes(k: int, label: str = label, order: list[str] = order) -> bool:
            return _step(steps, (label, k), sim, full, fp32, order[:k], q, source.model_id)

        # a later order only matters where it leaves more MACs in int8 than the best so far: its
        # largest such k bounds the bisection (and if even that k fails, every smaller one does too)
        best_share = max((c["int8_mac_share"] for c in choices.values()), default=-1.0)
        limit = max((k for k in range(len(order) + 1) if share(order[:k]) > best_share), default=-1)
        if limit < 0 or (limit < len(order) and not passes(limit)):
            continue
        keep = order[:_bisect(passes, limit)]
        figures = steps.get((label, len(keep)), {"min_cosine": 1.0, "mean_cosine": 1.0})
        choices[label] = {
            "keep_fp32": keep, **figures, "int8_mac_share": share(keep),
            "steps": {str(k): v for (lb, k), v in sorted(steps.items()) if lb == label},
        }
    best = max(choices, key=lambda label: (choices[label]["int8_mac_share"], label == "sensitivity"))
    chosen = choices[best]
    full_int8 = steps.get(("sensitivity", 0)) or _measure(sim, full, fp32, [])
    return {
        **search_key(source, q),
        "model_id": source.model_id,
        "measured_with": SIMULATION,
        "layers": len(layers),
        "order": best,
        "keep_fp32": chosen["keep_fp32"],
        "min_cosine": chosen["min_cosine"],
        "mean_cosine": chosen["mean_cosine"],
        "full_int8": full_int8,
        "int8_mac_share": chosen["int8_mac_share"],
        "orders": choices,
        "sensitivity": {name: sensitivity[name] for name in orders["sensitivity"]},
        "macs": {name: macs.get(name, 0) for name in orders["sensitivity"]},
        "seconds": round(time.time() - started, 1),
    }


def _step(steps: dict, key: tuple[str, int], sim: _Simulator, full: Any, fp32: Any, keep: list[str],
          q: QuantizationConfig, model_id: str) -> bool:
    """Whether the graph with ``keep`` in fp32 reaches the bound (measured once per key)."""
    if key not in steps:
        steps[key] = _measure(sim, full, fp32, keep, SENSITIVITY_FACES, q.target_min_cosine)
        logger.info("int8 search %s (%s): %d layer(s) in fp32 -> min cosine %.6f on %d faces", model_id,
                    key[0], len(keep), steps[key]["min_cosine"], steps[key]["faces"])
    return steps[key]["min_cosine"] >= q.target_min_cosine


def _bisect(passes, n: int) -> int:
    """The smallest ``k`` in ``0..n`` with ``passes(k)``, given ``passes(n)`` (known: every layer in
    fp32 is the source itself, or measured) and drift falling as ``k`` grows."""
    if passes(0):
        return 0
    low, high = 0, n  # low fails, high passes
    while high - low > 1:
        middle = (low + high) // 2
        if passes(middle):
            high = middle
        else:
            low = middle
    return high


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
