"""Which crops count toward a track's template, and the template itself (no Ray)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from data_jobs.quality import TemplatePolicy, counted_crops, track_templates
from data_jobs.staging import embedding_array


def _rows(tracks, frames, norms, seed=0):
    rng = np.random.default_rng(seed)
    emb = rng.normal(size=(len(tracks), 512)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    table = pa.table(
        {
            "track_id": pa.array(tracks, pa.string()),
            "frame": pa.array(frames, pa.string()),
            "embedding": embedding_array(emb),
            "norm": pa.array(np.asarray(norms, np.float32)),
            "contract": ["c"] * len(tracks),
        }
    )
    return table, emb


def _unit(v):
    return v / np.linalg.norm(v)


TRACKS = ["a"] * 5 + ["b"] * 3
FRAMES = ["00", "01", "02", "03", "04", "00", "01", "02"]
NORMS = [10.0, 30.0, 20.0, 20.0, 5.0, 8.0, 9.0, 7.0]


def _mask(policy):
    return counted_crops(
        np.array(TRACKS, object), np.array(FRAMES, object), np.array(NORMS, np.float32), policy
    )


def _marks(policy) -> str:
    """The mask as a string, rows of track a then b: ``1`` counted, ``0`` not."""
    return "".join("1" if m else "0" for m in _mask(policy))


def test_min_quality_and_best_k_select_the_crops():
    assert _marks(TemplatePolicy()) == "11111111"
    assert _marks(TemplatePolicy(min_quality=9.5)) == "11110000"
    # best 2 per track by norm; a tie (frames 02 and 03, norm 20) goes to the earlier frame
    assert _marks(TemplatePolicy(max_crops_per_track=2)) == "01100110"
    # both: the cap applies to the crops above the threshold
    assert _marks(TemplatePolicy(min_quality=15, max_crops_per_track=5)) == "01110000"


@pytest.mark.parametrize(
    "policy",
    [
        TemplatePolicy(),
        TemplatePolicy(min_quality=9.5),
        TemplatePolicy(max_crops_per_track=2),
        TemplatePolicy(max_crops_per_track=2, weighting="uniform"),
    ],
)
def test_template_is_the_documented_weighted_mean_of_the_counted_crops(policy):
    rows, emb = _rows(TRACKS, FRAMES, NORMS)
    mask = _mask(policy)
    templates = track_templates(rows, mask, policy)
    by_track = {r["track_id"]: r for r in templates.to_pylist()}
    norms = np.asarray(NORMS)
    for track in ("a", "b"):
        sel = np.array([t == track for t in TRACKS]) & mask
        row = by_track[track]
        assert row["frame_count"] == TRACKS.count(track) and row["crops_used"] == sel.sum()
        assert row["mean_norm"] == pytest.approx(norms[np.array(TRACKS) == track].mean())
        if not sel.any():
            assert row["template"] is None
            continue
        weights = norms[sel] if policy.weighting == "norm" else np.ones(sel.sum())
        expected = _unit((emb[sel] * weights[:, None]).sum(0))
        np.testing.assert_allclose(row["template"], expected, atol=1e-6)


def test_the_filters_change_the_template():
    rows, _ = _rows(TRACKS, FRAMES, NORMS)
    every = track_templates(rows, _mask(TemplatePolicy()), TemplatePolicy())
    best = track_templates(rows, _mask(TemplatePolicy(max_crops_per_track=1)), TemplatePolicy())
    uniform = track_templates(rows, _mask(TemplatePolicy()), TemplatePolicy(weighting="uniform"))
    a = [np.asarray(t["template"][0].as_py()) for t in (every, best, uniform)]
    assert not np.allclose(a[0], a[1]) and not np.allclose(a[0], a[2])
    # best-1 is the single best crop of track a (frame 01, norm 30)
    np.testing.assert_allclose(a[1], rows["embedding"][1].as_py(), atol=1e-6)
    assert best["crops_used"].to_pylist() == [1, 1]


def test_a_track_with_no_crop_above_min_quality_has_a_null_template_and_keeps_its_row():
    rows, _ = _rows(TRACKS, FRAMES, NORMS)
    policy = TemplatePolicy(min_quality=9.5)
    templates = track_templates(rows, _mask(policy), policy)
    assert templates["track_id"].to_pylist() == ["a", "b"]
    assert templates["crops_used"].to_pylist() == [4, 0]
    assert templates["template"].null_count == 1 and templates["template"][1].as_py() is None
