"""How far one backend's embeddings are from another's on the same faces.

The numbers that matter for a face index: cosine between the two embeddings of
each face (mean, min, 1st percentile, where the worst one is, a histogram),
and how often the *decision* changes: with each face's nearest other face as
its top-1 match, the fraction of faces whose top-1 match differs between the
two backends. A tiny cosine drift that never flips a match is harmless; one
that flips matches is not, whatever its mean.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass

import numpy as np

from .base.contract import EmbeddingEngine

logger = logging.getLogger(__name__)

HISTOGRAM_BINS = 20


@dataclass(frozen=True)
class DriftReport:
    """Per-face cosine agreement of two embedding sets of the same faces."""

    n: int
    mean_cosine_sim: float
    min_cosine_sim: float
    p01_cosine_sim: float
    max_drift_face_idx: int
    histogram_edges: list[float]
    histogram_counts: list[int]
    decision_flip_rate: float
    max_drift: float | None = None
    passed: bool | None = None

    @property
    def max_observed_drift(self) -> float:
        return 1.0 - self.min_cosine_sim

    def gate(self, max_drift: float) -> DriftReport:
        """This report judged against ``min cosine >= 1 - max_drift``."""
        return DriftReport(
            **{
                **asdict(self),
                "max_drift": max_drift,
                "passed": bool(self.min_cosine_sim >= 1.0 - max_drift),
            }
        )

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        verdict = "" if self.passed is None else (" PASS" if self.passed else " FAIL")
        bound = "" if self.max_drift is None else f" (bound: min >= {1 - self.max_drift:.6f})"
        return (
            f"{self.n} faces: cosine mean {self.mean_cosine_sim:.6f}, min "
            f"{self.min_cosine_sim:.6f} (face {self.max_drift_face_idx}), p1 "
            f"{self.p01_cosine_sim:.6f}; top-1 decision flips {self.decision_flip_rate:.2%}"
            f"{bound}{verdict}"
        )


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(norms > 0, norms, 1.0)


def _top1(e: np.ndarray) -> np.ndarray:
    sims = e @ e.T
    np.fill_diagonal(sims, -np.inf)
    return sims.argmax(axis=1)


def compare_embeddings(a: np.ndarray, b: np.ndarray) -> DriftReport:
    """Compare two ``(N, D)`` embedding sets row by row (rows need not be normalised)."""
    a, b = np.asarray(a), np.asarray(b)
    if a.ndim != 2 or a.shape != b.shape:
        raise ValueError(f"need two (N, D) arrays of equal shape, got {a.shape} and {b.shape}")
    if a.shape[0] == 0:
        raise ValueError("need at least one embedding to compare")
    ua, ub = _unit(a), _unit(b)
    cos = np.clip((ua * ub).sum(axis=1), -1.0, 1.0)
    lo = float(min(cos.min(), 1.0 - 1e-6))
    counts, edges = np.histogram(cos, bins=HISTOGRAM_BINS, range=(lo, 1.0))
    flips = float(np.mean(_top1(ua) != _top1(ub))) if a.shape[0] > 2 else 0.0
    return DriftReport(
        n=int(a.shape[0]),
        mean_cosine_sim=float(cos.mean()),
        min_cosine_sim=float(cos.min()),
        p01_cosine_sim=float(np.percentile(cos, 1)),
        max_drift_face_idx=int(cos.argmin()),
        histogram_edges=[float(e) for e in edges],
        histogram_counts=[int(c) for c in counts],
        decision_flip_rate=flips,
    )


def run_embedding_regression_tests(
    faces: np.ndarray,
    reference: EmbeddingEngine,
    candidate: EmbeddingEngine,
    max_drift: float,
) -> DriftReport:
    """Embed ``faces`` with both engines; pass iff min cosine >= 1 - ``max_drift``."""
    ref = reference.encode(faces)
    cand = candidate.encode(faces)
    report = compare_embeddings(ref, cand).gate(max_drift)
    logger.info(
        "drift %s vs %s: %s",
        candidate.info.backend,
        reference.info.backend,
        report.summary(),
    )
    return report
