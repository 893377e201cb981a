"""Verification accuracy of each benchmarked engine next to its speed (``arcface bench --report
--accuracy``): ``arcface evaluate``'s metrics and paired-bootstrap deltas against the insightface
reference, on identities made of jittered copies of the faces the insightface package ships.

The same figures come from the command line (README "Recognition accuracy"); this puts them in
``report.json`` beside each row. With synthetic weights they show the plumbing and the deltas
between precisions, not a face model's accuracy (the report says so).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

PER_IDENTITY = 4  # crops per identity: every genuine pair and as many sampled impostors
JITTER_STRENGTH = 0.7
SEED = 0


def jittered_identities(per_identity: int = PER_IDENTITY, seed: int = SEED):
    """``LabelledFaces`` of the shipped faces, ``per_identity`` jittered crops each (deterministic)."""
    from ..evaluate.labelled import LabelledFaces
    from ..models.sample_faces import jitter_face, source_faces

    rng = np.random.default_rng(seed)
    crops, identities, paths = [], [], []
    for face in source_faces():
        for k in range(per_identity):
            crops.append(jitter_face(face, rng, strength=JITTER_STRENGTH))
            identities.append(face.name)
            paths.append(f"{face.name}#{k}")
    return LabelledFaces(np.stack(crops), tuple(identities), tuple(paths))


def accuracy_report(model_ref: str, candidates: list[tuple[str, str]], cfg: Any,
                    resamples: int = 200) -> dict[str, Any]:
    """Per ``(backend, precision)``: its metrics and its deltas against ``candidates[0]`` (the
    reference), engines started in this process without the drift gate (this is the measurement)."""
    from ..evaluate.labelled import identity_pairs
    from ..evaluate.run import EngineSpec, run_evaluation
    from ..factory import configured_model

    faces = jittered_identities()
    pairs = identity_pairs(faces.identities, None, SEED)
    specs = [EngineSpec(backend, precision) for backend, precision in candidates]
    report = run_evaluation(faces, pairs, specs, configured_model(cfg, model_ref), cfg,
                            resamples=resamples, seed=SEED)
    report.pop("_scores")
    per_engine: dict[str, Any] = {}
    for result in report["engines"]:
        m = result["metrics"]
        per_engine[result["engine"]["spec"]] = {"accuracy_kfold": m["accuracy_kfold"]["mean"],
                                                "roc_auc": m["roc_auc"], "eer": m["eer"]["rate"]}
    for delta in report["deltas"]:
        entry = per_engine[delta["engine_b"]].setdefault("delta_vs_reference", {})
        entry[delta["metric"]] = {k: delta[k] for k in ("delta", "ci_low", "ci_high")}
    return {"faces": report["faces"], "identities": report["identities"], "pairs": len(pairs),
            "bootstrap_resamples": resamples, "engines": per_engine, "note": report["note"]}
