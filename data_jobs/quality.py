"""Which crops count toward their track's template, and the quality-weighted template.

The quality signal is the embedding's norm *before* L2 normalisation (``norm``): ArcFace-
family networks give blurred, occluded, tiny or badly aligned faces a smaller feature norm
(MagFace and AdaFace make that explicit in training; plain ArcFace shows it too), so it
ranks the crops of one track at no extra cost. Three settings (``config/episodes.yaml``):

- ``min_quality``: a crop counts only when ``norm >= min_quality`` (0: every crop);
- ``max_crops_per_track``: of those, only the best k by norm count (0: no cap); ties
  go to the earlier frame, so the choice is deterministic;
- ``template_weighting``: ``norm`` (default) makes the template
  ``normalise(sum_i norm_i * e_i)`` over the counted crops, with ``e_i`` the unit
  embeddings: the same as summing the un-normalised features, so a sharp crop weighs
  more than a blurred one; ``uniform`` is ``normalise(sum_i e_i)``, the plain mean.

Every row stays in the output with ``in_template`` saying whether it counted; a track
whose crops all fall below ``min_quality`` keeps its template row with ``crops_used`` 0
and a null ``template`` (it has no face good enough to stand for it).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from engines import template_weights, weighted_templates

from .settings import EpisodeJobSettings
from .staging import embedding_array


@dataclass(frozen=True)
class TemplatePolicy:
    min_quality: float = 0.0
    max_crops_per_track: int = 0  # 0: no cap
    weighting: str = "norm"  # "norm" | "uniform"

    @classmethod
    def of(cls, settings: EpisodeJobSettings) -> TemplatePolicy:
        return cls(settings.min_quality, settings.max_crops_per_track, settings.template_weighting)


def counted_crops(
    tracks: np.ndarray, frames: np.ndarray, norms: np.ndarray, policy: TemplatePolicy
) -> np.ndarray:
    """Boolean mask: which rows count toward their track's template (vectorised, no row loop)."""
    counted = norms >= policy.min_quality
    if policy.max_crops_per_track <= 0 or len(norms) == 0:
        return counted
    # rank within track among the eligible rows: best norm first, then the earlier frame
    track_codes = np.unique(tracks, return_inverse=True)[1]
    frame_codes = np.unique(frames, return_inverse=True)[1]
    order = np.lexsort((frame_codes, -norms.astype(np.float64), ~counted, track_codes))
    sorted_tracks = track_codes[order]
    starts = np.r_[0, np.flatnonzero(sorted_tracks[1:] != sorted_tracks[:-1]) + 1]
    rank = np.arange(len(order)) - np.repeat(starts, np.diff(np.r_[starts, len(order)]))
    keep = np.zeros(len(norms), bool)
    keep[order] = rank < policy.max_crops_per_track
    return counted & keep


def _embeddings(rows: pa.Table) -> np.ndarray:
    column = rows["embedding"].combine_chunks()
    return column.flatten().to_numpy().reshape(rows.num_rows, column.type.list_size)


def track_templates(rows: pa.Table, counted: np.ndarray, policy: TemplatePolicy) -> pa.Table:
    """One row per track of ``rows`` (``track_id, embedding, norm, contract``): the template over
    the ``counted`` rows (see the module docstring), ``frame_count`` (rows of the track),
    ``crops_used``, ``mean_norm`` (over all the track's rows) and the contract."""
    tracks = rows["track_id"].to_numpy(zero_copy_only=False)
    emb = _embeddings(rows)
    norms = rows["norm"].to_numpy()
    names, inverse, counts = np.unique(tracks, return_inverse=True, return_counts=True)
    weights = template_weights(norms, policy.weighting, counted)
    templates = weighted_templates(inverse, emb, weights, len(names))
    used = np.bincount(inverse, weights=counted.astype(np.int64), minlength=len(names)).astype(np.int64)
    mask = pa.array(used == 0)  # no crop counted: no template
    template = pc.if_else(
        mask, pa.nulls(len(names), embedding_array(templates).type), embedding_array(templates)
    )
    norm_mean = np.bincount(inverse, weights=norms, minlength=len(names)) / counts
    contract = rows["contract"][0].as_py() if rows.num_rows else None
    return pa.table(
        {
            "track_id": pa.array(names.tolist(), pa.string()),
            "template": template,
            "frame_count": pa.array(counts, pa.int64()),
            "crops_used": pa.array(used, pa.int64()),
            "mean_norm": pa.array(norm_mean.astype(np.float32)),
            "contract": pa.array([contract] * len(names), pa.string()),
        }
    )
