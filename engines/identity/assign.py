"""Track templates -> identities: the gallery's top-1 above a threshold, else a cluster of unknowns.

Each track's template (the episode job's ``templates`` table) is searched against the
gallery (``search.py``); a track whose best cosine reaches ``threshold`` takes that
identity. The others (unknown) are clustered (``cluster.py``) within their episode, or over
every episode given at once (``across``), and named ``unknown-<episode>-<n>`` (per episode)
or ``unknown-<n>`` (across episodes), ``n`` from 0 in order of first track. A track with no
template (none of its crops passed ``min_quality``) is ``unknown`` with kind ``none``.

The ``identities`` schema (``IDENTITY_SCHEMA``): ``episode_id``, ``track_id``, ``identity``,
``kind`` (``gallery`` | ``cluster`` | ``none``), ``cluster`` (int64, null for gallery
matches), ``score`` (top-1 gallery cosine, null without a template or gallery),
``candidate`` (the top-1 gallery identity even when below the threshold), ``frame_count``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from .cluster import cluster_vectors
from .gallery import Gallery
from .search import search

IDENTITY_SCHEMA = pa.schema([
    ("episode_id", pa.string()), ("track_id", pa.string()), ("identity", pa.string()),
    ("kind", pa.string()), ("cluster", pa.int64()), ("score", pa.float32()),
    ("candidate", pa.string()), ("frame_count", pa.int64()),
])


@dataclass(frozen=True)
class AssignPolicy:
    """``threshold``: the gallery cosine a match needs; ``cluster_distance``: average-linkage cosine
    distance for unknown tracks; ``across``: cluster over all episodes at once."""

    threshold: float = 0.5
    cluster_distance: float = 0.5
    across: bool = False


def assign_tracks(templates: pa.Table, gallery: Gallery, policy: AssignPolicy) -> pa.Table:
    """``identities`` rows (``IDENTITY_SCHEMA``) for the tracks in ``templates`` (``episode_id,
    track_id, template, frame_count``), in (episode, track) order."""
    templates = templates.sort_by([("episode_id", "ascending"), ("track_id", "ascending")])
    n = templates.num_rows
    episodes = np.asarray(templates["episode_id"].to_pylist(), dtype=object)
    has = np.asarray(templates["template"].is_valid().to_pylist(), bool) if n else np.zeros(0, bool)
    column = templates["template"].combine_chunks() if n else None
    dim = column.type.list_size if column is not None else gallery.dim
    vectors = np.zeros((n, dim), np.float32)
    if has.any():
        valid = column.filter(pa.array(has))
        vectors[has] = valid.flatten().to_numpy(zero_copy_only=False).reshape(-1, dim)
    score = np.full(n, np.nan, np.float32)
    candidate: list[str | None] = [None] * n
    matched = np.zeros(n, bool)
    if has.any() and len(gallery):
        found = search(gallery, vectors[has], top_k=1, threshold=policy.threshold)
        score[has] = found.score[:, 0]
        matched[has] = found.matched
        for row, j in zip(np.flatnonzero(has), found.index[:, 0], strict=True):
            candidate[row] = gallery.names[int(j)]
    unknown = has & ~matched
    cluster = np.full(n, -1, np.int64)
    groups = [np.flatnonzero(unknown)] if policy.across else [
        np.flatnonzero(unknown & (episodes == e)) for e in dict.fromkeys(episodes.tolist())]
    for rows in groups:
        if len(rows):
            cluster[rows] = cluster_vectors(vectors[rows], policy.cluster_distance)
    identity, kind = [], []
    for i in range(n):
        if matched[i]:
            identity.append(candidate[i])
            kind.append("gallery")
        elif unknown[i]:
            scope = "" if policy.across else f"{episodes[i]}-"
            identity.append(f"unknown-{scope}{cluster[i]}")
            kind.append("cluster")
        else:
            identity.append("unknown")
            kind.append("none")
    frames = templates["frame_count"] if "frame_count" in templates.column_names else pa.nulls(n, pa.int64())
    return pa.table({
        "episode_id": templates["episode_id"], "track_id": templates["track_id"],
        "identity": pa.array(identity, pa.string()), "kind": pa.array(kind, pa.string()),
        "cluster": pa.array(cluster, pa.int64(), mask=cluster < 0),
        "score": pa.array(score, pa.float32(), mask=np.isnan(score)),
        "candidate": pa.array(candidate, pa.string()), "frame_count": pa.array(frames, pa.int64()),
    }, schema=IDENTITY_SCHEMA)
