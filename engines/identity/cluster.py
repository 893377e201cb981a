"""Grouping tracks no gallery identity claims: agglomerative clustering on cosine distance.

Linkage ``average`` (UPGMA): two groups merge while the mean cosine distance between their
members is ``<= distance`` (default 0.5, i.e. mean cosine >= 0.5). Average rather than
single linkage, because single linkage chains: one ambiguous track would bridge two
people. Like the match threshold, the distance is model-specific: for a real model use
``1 - threshold`` from ``arcface gallery calibrate``. Exact (``scipy``'s O(n^2) memory):
meant for the unknown tracks of an episode, or of a series of episodes (tens of thousands).
"""

from __future__ import annotations

import numpy as np

LINKAGE = "average"


def cluster_vectors(vectors: np.ndarray, distance: float = 0.5) -> np.ndarray:
    """Cluster labels ``0..C-1`` for the rows of ``vectors`` (unit vectors), numbered in order of
    each cluster's first row, so the same input always gives the same labels."""
    if not 0.0 <= distance <= 2.0:
        raise ValueError(f"cluster distance is a cosine distance in [0, 2], got {distance}")
    vectors = np.asarray(vectors, np.float64)
    n = vectors.shape[0]
    if n == 0:
        return np.zeros(0, np.int64)
    if n == 1:
        return np.zeros(1, np.int64)
    from scipy.cluster.hierarchy import fcluster, linkage
    from scipy.spatial.distance import pdist

    # pdist's cosine is 1 - cos; clip the float noise below 0 that identical vectors give.
    dist = np.clip(pdist(vectors, "cosine"), 0.0, 2.0)
    raw = fcluster(linkage(dist, method=LINKAGE), t=distance, criterion="distance")
    _, first, inverse = np.unique(raw, return_index=True, return_inverse=True)
    rank = np.empty(len(first), np.int64)
    rank[np.argsort(first, kind="stable")] = np.arange(len(first))
    return rank[inverse]
