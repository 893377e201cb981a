"""``arcface evaluate``'s measurement: embed labelled faces with each engine, score the pairs,
compute the verification metrics, and the deltas of every other engine against the first.

Engines start without the drift gate: this *is* a measurement, and a path the gate would
refuse (full int8, say) must still be measurable. They must all answer in one vector space
(one contract id), or their scores are not comparable and the command says so.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..config.schema import BACKEND_NAMES, PRECISIONS, Config
from ..errors import ConfigError
from ..models.resolve import ResolvedModel
from .labelled import LabelledFaces, Pairs
from .metrics import best_threshold, bootstrap_delta, eer, kfold_accuracy, roc_auc, tar_at_far

logger = logging.getLogger(__name__)

FAR_TARGETS = (1e-2, 1e-3, 1e-4)


@dataclass(frozen=True)
class EngineSpec:
    """``backend[:precision]`` as the command line gives it."""

    backend: str
    precision: str | None = None

    @classmethod
    def parse(cls, text: str) -> EngineSpec:
        backend, _, precision = text.strip().partition(":")
        if backend not in BACKEND_NAMES:
            raise ValueError(f"unknown backend {backend!r} in {text!r}; choose from "
                             f"{', '.join(BACKEND_NAMES)}")
        if precision and precision not in PRECISIONS:
            raise ValueError(f"unknown precision {precision!r} in {text!r}; choose from "
                             f"{', '.join(PRECISIONS)}")
        return cls(backend, precision or None)

    def __str__(self) -> str:
        return f"{self.backend}:{self.precision}" if self.precision else self.backend


def metrics(scores: np.ndarray, same: np.ndarray, folds: int) -> dict[str, Any]:
    """Every figure for one score set (see ``metrics``)."""
    rate, eer_threshold = eer(scores, same)
    accuracy, threshold = best_threshold(scores, same)
    return {
        "pairs": int(same.size), "genuine": int(same.sum()), "impostors": int((~same).sum()),
        "accuracy_kfold": {"folds": folds, **kfold_accuracy(scores, same, folds).to_dict()},
        "accuracy_best_threshold": {"accuracy": accuracy, "threshold": threshold},
        "tar_at_far": [tar_at_far(scores, same, far).to_dict() for far in FAR_TARGETS],
        "roc_auc": roc_auc(scores, same),
        "eer": {"rate": rate, "threshold": eer_threshold},
        "genuine_mean": float(scores[same].mean()), "impostor_mean": float(scores[~same].mean()),
    }


def _delta_fns() -> dict[str, Any]:
    fns: dict[str, Any] = {"accuracy": lambda s, y: best_threshold(s, y)[0], "roc_auc": roc_auc}
    for far in FAR_TARGETS:
        fns[f"tar@far={far:g}"] = lambda s, y, far=far: tar_at_far(s, y, far).tar
    return fns


def roc_points(scores: np.ndarray, same: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(FAR, TAR)`` at every candidate threshold, highest threshold first (for the plot)."""
    thresholds = np.append(np.unique(scores)[::-1], -np.inf)
    far = np.array([(scores[~same] >= t).mean() for t in thresholds])
    tar = np.array([(scores[same] >= t).mean() for t in thresholds])
    return far, tar


def run_evaluation(faces: LabelledFaces, pairs: Pairs, specs: list[EngineSpec], model: ResolvedModel,
                   cfg: Config, folds: int = 10, resamples: int = 1000, seed: int = 0) -> dict[str, Any]:
    """The report: per engine its metrics, then each later engine's deltas against the first."""
    from ..factory import get_engine

    if not specs:
        raise ValueError("need at least one engine to evaluate")
    results, scores_by_engine = [], []
    for spec in specs:
        engine = get_engine(spec.backend, model, precision=spec.precision, config=cfg,
                            validate_on_startup=False)
        info = engine.info
        started = time.perf_counter()
        emb = engine.encode(faces.crops)
        seconds = time.perf_counter() - started
        engine.close()
        scores = np.clip((emb[pairs.first] * emb[pairs.second]).sum(axis=1).astype(np.float64), -1.0, 1.0)
        scores_by_engine.append(scores)
        results.append({
            "engine": {"spec": str(spec), "backend": info.backend, "precision": info.precision,
                       "model_id": info.model_id, "contract": info.contract, "synthetic": info.synthetic,
                       "probe": info.probe, "embed_seconds": round(seconds, 3)},
            "metrics": metrics(scores, pairs.same, folds),
        })
        logger.info("%s: %s", spec, results[-1]["metrics"]["roc_auc"])
    contracts = {r["engine"]["contract"] for r in results}
    if len(contracts) > 1:
        raise ConfigError(f"the engines answer in different vector spaces (contracts {sorted(contracts)}); "
                          "compare backends and precisions of one model")
    deltas = []
    for other, scores in zip(results[1:], scores_by_engine[1:], strict=True):
        for name, fn in _delta_fns().items():
            delta = bootstrap_delta(name, fn, scores_by_engine[0], scores, pairs.same, resamples, seed=seed)
            deltas.append({"engine_a": results[0]["engine"]["spec"], "engine_b": other["engine"]["spec"],
                           **delta.to_dict()})
    return {
        "model": model.model_id, "synthetic": model.synthetic, "faces": int(faces.crops.shape[0]),
        "identities": len({i for i in faces.identities if i is not None}) or None,
        "folds": folds, "bootstrap_resamples": resamples, "seed": seed,
        "engines": results, "deltas": deltas,
        "note": ("SYNTHETIC weights: the figures show the plumbing, not a face model's accuracy"
                 if model.synthetic else None),
        "_scores": scores_by_engine,
    }


def plot_roc(report: dict[str, Any], pairs: Pairs, path: Path) -> None:
    """TAR against FAR (log scale), one curve per engine."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4.2))
    for result, scores in zip(report["engines"], report["_scores"], strict=True):
        far, tar = roc_points(scores, pairs.same)
        positive = far > 0
        ax.plot(far[positive], tar[positive], label=f"{result['engine']['spec']} "
                f"(AUC {result['metrics']['roc_auc']:.4f})")
    ax.set_xscale("log")
    ax.set_xlabel("false accept rate")
    ax.set_ylabel("true accept rate")
    title = report["model"] + (" (SYNTHETIC)" if report["synthetic"] else "")
    ax.set_title(f"{title}: {len(pairs)} pairs")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
