"""1:N search: each query's top-k identities by cosine, and a decision against a threshold.

Templates and queries are unit vectors, so cosine is a dot product: one ``(N, K)`` matrix
product, then a partial sort per row (``argpartition``), exact for any gallery that fits in
memory (a million identities of 512 float32 is 2 GB). The decision is the top-1 identity
when its cosine is ``>= threshold``, else ``unknown``; the threshold must be calibrated on
the user's data (``arcface gallery calibrate``): synthetic weights identify nobody.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .gallery import Gallery

UNKNOWN = "unknown"


@dataclass(frozen=True)
class Matches:
    """For N queries: ``index[i, j]`` (into the gallery's names) and ``score[i, j]`` (cosine) of the
    j-th best identity, best first, ``k = min(top_k, len(gallery))`` columns."""

    index: np.ndarray  # (N, k) int64
    score: np.ndarray  # (N, k) float32
    names: tuple[str, ...]
    threshold: float

    @property
    def matched(self) -> np.ndarray:
        """(N,) bool: the best identity reaches the threshold."""
        if self.score.shape[1] == 0:
            return np.zeros(self.score.shape[0], bool)
        return self.score[:, 0] >= self.threshold

    def best(self) -> list[tuple[str, float]]:
        """Per query: (identity or ``unknown``, best cosine; -1.0 with an empty gallery)."""
        matched = self.matched
        out = []
        for i in range(self.score.shape[0]):
            if self.score.shape[1] == 0:
                out.append((UNKNOWN, -1.0))
            else:
                name = self.names[int(self.index[i, 0])] if matched[i] else UNKNOWN
                out.append((name, float(self.score[i, 0])))
        return out

    def to_dicts(self) -> list[dict]:
        """The identify answer, per query: ``identity`` (or ``unknown``), ``match``, ``score``
        (top-1 cosine) and ``candidates`` (``identity``, ``score``, best first)."""
        results = []
        for i, (name, score) in enumerate(self.best()):
            results.append({
                "identity": name,
                "match": name != UNKNOWN,
                "score": round(score, 6),
                "candidates": [{"identity": self.names[int(j)], "score": round(float(s), 6)}
                               for j, s in zip(self.index[i], self.score[i], strict=True)],
            })
        return results


def search(gallery: Gallery, queries: np.ndarray, top_k: int = 5, threshold: float = 0.5) -> Matches:
    """Top-``top_k`` identities of each row of ``queries`` (``(N, D)`` unit vectors)."""
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    if not -1.0 <= threshold <= 1.0:
        raise ValueError(f"threshold is a cosine in [-1, 1], got {threshold}")
    queries = np.asarray(queries, np.float32)
    if queries.ndim != 2 or (len(gallery) and queries.shape[1] != gallery.dim):
        raise ValueError(f"queries must be (N, {gallery.dim}), got {queries.shape}")
    n, k = queries.shape[0], min(top_k, len(gallery))
    if k == 0 or n == 0:
        return Matches(np.zeros((n, k), np.int64), np.zeros((n, k), np.float32), gallery.names, threshold)
    scores = queries @ gallery.templates.T
    if k < scores.shape[1]:
        part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    else:
        part = np.broadcast_to(np.arange(scores.shape[1]), scores.shape).copy()
    part_scores = np.take_along_axis(scores, part, axis=1)
    order = np.argsort(-part_scores, axis=1, kind="stable")
    index = np.take_along_axis(part, order, axis=1).astype(np.int64)
    return Matches(index, np.take_along_axis(part_scores, order, axis=1), gallery.names, threshold)
