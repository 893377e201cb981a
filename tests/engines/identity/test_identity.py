"""The identity core on real faces through a real engine: gallery, 1:N search, clustering, screen time."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
from identity_faces import JITTER, THRESHOLD, enroll_jitters, jitters

from engines import ConfigError, get_engine, source_faces
from engines.identity.assign import AssignPolicy, assign_tracks
from engines.identity.cluster import cluster_vectors
from engines.identity.gallery import enroll, gallery_version, load_gallery, open_gallery_store, remove
from engines.identity.screen_time import screen_time
from engines.identity.search import UNKNOWN, search

ENROLLED = range(6)  # the group photo's six faces; Tom Hanks (6) stays out of the gallery
STRANGER = 6


@pytest.fixture(scope="module")
def engine():
    return get_engine("onnx", "synthetic:mobilefacenet", device="cpu")


@pytest.fixture()
def store(engine, tmp_path):
    info = engine.info
    return open_gallery_store(str(tmp_path / "gallery"), info.contract, info.model_id, info.embedding_dim)


def test_the_margin_identity_tests_rely_on(engine):
    """Synthetic weights keep a jittered copy (JITTER, unmirrored) nearer its source than any other."""
    sources = engine.encode(np.stack([f.crop for f in source_faces()]))
    same, other = [], []
    for i in range(len(source_faces())):
        cos = engine.encode(jitters(i, 8, seed=100 + i)) @ sources.T
        same.append(cos[:, i].min())
        other.append(np.delete(cos, i, axis=1).max())
    assert min(same) > THRESHOLD > max(other), (JITTER, min(same), max(other))


def test_enroll_then_identify_held_out_jitters_and_a_stranger(engine, store):
    table = enroll_jitters(engine, store, ENROLLED)
    assert table.num_rows == 6 and table["members"].to_pylist() == [3] * 6
    gallery = load_gallery(store, engine.info.embedding_dim)
    assert gallery.version == gallery_version(store) >= 1
    probes = np.concatenate([jitters(i, 2, seed=500 + i) for i in ENROLLED])
    found = search(gallery, engine.encode(probes), top_k=3, threshold=THRESHOLD)
    expected = [source_faces()[i].name for i in ENROLLED for _ in range(2)]
    assert [name for name, _ in found.best()] == expected
    assert found.index.shape == (12, 3) and (np.diff(found.score, axis=1) <= 0).all()
    stranger = search(gallery, engine.encode(jitters(STRANGER, 3, seed=9)), threshold=THRESHOLD)
    assert [name for name, _ in stranger.best()] == [UNKNOWN] * 3
    answer = stranger.to_dicts()[0]
    assert answer["match"] is False and len(answer["candidates"]) == 5


def test_enrolling_again_replaces_members_and_remove_drops_an_identity(engine, store):
    enroll_jitters(engine, store, ENROLLED)
    version = gallery_version(store)
    table = enroll_jitters(engine, store, [0], per_identity=4, seed=50)  # sources 0/0..0/2 again, plus 0/3
    assert dict(zip(table["identity"].to_pylist(), table["members"].to_pylist(), strict=True))[
        source_faces()[0].name] == 4
    assert gallery_version(store) > version
    table = remove(store, [source_faces()[1].name], engine.info.embedding_dim)
    assert source_faces()[1].name not in table["identity"].to_pylist() and table.num_rows == 5
    with pytest.raises(ValueError, match="not in gallery"):
        remove(store, ["nobody"], engine.info.embedding_dim)


def test_a_gallery_of_another_contract_is_refused_naming_both(engine, store, tmp_path):
    enroll_jitters(engine, store, [0], per_identity=1)
    with pytest.raises(ConfigError) as err:
        open_gallery_store(store.uri, "other-contract-123", "synthetic:iresnet50", 512)
    assert engine.info.contract in str(err.value) and "other-contract-123" in str(err.value)


def test_bad_enrollments_are_refused(engine, store):
    emb, norms = engine.encode_with_norms(jitters(0, 1, 0))
    with pytest.raises(ValueError, match="identity name"):
        enroll(store, ["../etc"], ["a"], emb, norms)
    with pytest.raises(ValueError, match="as many"):
        enroll(store, ["a", "b"], ["a"], emb, norms)


def test_unknown_tracks_of_one_face_cluster_together(engine):
    vectors = np.concatenate([engine.encode(jitters(i, 4, seed=200 + i)) for i in (2, 4, 6)])
    labels = cluster_vectors(vectors, distance=1 - THRESHOLD)
    assert labels.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert cluster_vectors(vectors[:1]).tolist() == [0] and cluster_vectors(vectors[:0]).size == 0


def _templates(engine, episode, faces):
    rows = {"episode_id": [], "track_id": [], "template": [], "frame_count": []}
    for t, i in enumerate(faces):
        emb = engine.encode(jitters(i, 5, seed=300 + 10 * t + i)).sum(0)
        rows["episode_id"].append(episode)
        rows["track_id"].append(f"track{t:03d}")
        rows["template"].append((emb / np.linalg.norm(emb)).tolist())
        rows["frame_count"].append(5)
    return pa.table({**rows, "template": pa.array(rows["template"], pa.list_(pa.float32(), 512))})


def test_assign_tracks_labels_matches_and_clusters_unknowns(engine, store):
    enroll_jitters(engine, store, [0, 1])
    gallery = load_gallery(store, 512)
    templates = pa.concat_tables([_templates(engine, "ep0", [0, 6, 1, 6]), _templates(engine, "ep1", [6, 1])])
    per_episode = assign_tracks(templates, gallery, AssignPolicy(THRESHOLD, 1 - THRESHOLD))
    names = [source_faces()[i].name for i in (0, 1)]
    assert per_episode["identity"].to_pylist() == [names[0], "unknown-ep0-0", names[1], "unknown-ep0-0",
                                                   "unknown-ep1-0", names[1]]
    assert per_episode["kind"].to_pylist() == ["gallery", "cluster", "gallery", "cluster", "cluster",
                                               "gallery"]
    across = assign_tracks(templates, gallery, AssignPolicy(THRESHOLD, 1 - THRESHOLD, across=True))
    assert across["identity"].to_pylist()[1::2][:2] == ["unknown-0", "unknown-0"]
    assert across["identity"].to_pylist()[4] == "unknown-0"


def test_screen_time_counts_distinct_instants_per_identity():
    rows = pa.table({"episode_id": ["e"] * 6, "track_id": ["a", "a", "a", "b", "b", "c"],
                     "frame": ["00000", "00001", "00002", "00002", "00003", "00010"]})
    assignments = pa.table({"episode_id": ["e", "e", "e"], "track_id": ["a", "b", "c"],
                            "identity": ["ann", "ann", "bob"]})
    table = screen_time(rows, assignments, fps=2.0).to_pylist()
    assert [(r["identity"], r["frames"], r["seconds"], r["tracks"], r["first_seen_s"], r["last_seen_s"])
            for r in table] == [("ann", 4, 2.0, 2, 0.0, 1.5), ("bob", 1, 0.5, 1, 5.0, 5.0)]
    stamped = rows.append_column("timestamp", pa.array(
        np.datetime64("2026-01-01T00:00:00", "ms") + np.array([0, 40, 80, 80, 120, 400]), pa.timestamp("ms")))
    table = screen_time(stamped, assignments, fps=25.0).to_pylist()
    assert table[0]["time_source"] == "timestamp" and table[0]["last_seen_s"] == pytest.approx(0.12)
    assert table[1]["first_seen_s"] == pytest.approx(0.4) and table[0]["seconds"] == pytest.approx(4 / 25)
    with pytest.raises(ValueError, match="integer frame ids"):
        screen_time(rows.set_column(2, "frame", pa.array(["x"] * 6)), assignments, 25.0)


def test_a_gallery_on_s3_enrolls_loads_and_refuses_another_contract(engine, bucket, s3_endpoint):
    """The same gallery on the S3 API (a real moto server): Lance tables and the stamp under a prefix."""
    info = engine.info
    uri = f"s3://{bucket}/galleries/main"
    store = open_gallery_store(uri, info.contract, info.model_id, info.embedding_dim,
                               endpoint_url=s3_endpoint)
    enroll_jitters(engine, store, [0, 1])
    gallery = load_gallery(store, info.embedding_dim)
    assert gallery.names == tuple(sorted(source_faces()[i].name for i in (0, 1))) and gallery.version >= 1
    found = search(gallery, engine.encode(jitters(1, 1, seed=77)), threshold=THRESHOLD)
    assert found.best()[0][0] == source_faces()[1].name
    with pytest.raises(ConfigError, match="other-contract"):
        open_gallery_store(uri, "other-contract", "m", 512, endpoint_url=s3_endpoint)
