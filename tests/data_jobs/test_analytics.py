"""The job as the input of an analytics pipeline (issue 14), on a real local Ray: pass-through
columns into Parquet and Lance, quality-aware templates, an episode read while the job still
runs, progress.json, the Lance store's top-k against a brute-force search, contract refusal."""

from __future__ import annotations

import json
import shutil
import threading
import uuid
from pathlib import Path

import lancedb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from processes import wait_for

from data_jobs.job import JobSpec, run_job
from data_jobs.quality import TemplatePolicy, counted_crops
from data_jobs.reader import committed_episodes, read_committed
from data_jobs.sample import make_synthetic_manifest
from data_jobs.settings import load_job_settings
from engines import ConfigError

pytestmark = pytest.mark.integration

MODEL = "synthetic:mobilefacenet"
PASS_THROUGH = ("timestamp", "box", "det_score", "shot_id")
HELD = "ep0002"


def spec(input_uri: str, output: str, model=MODEL, **settings) -> JobSpec:
    return JobSpec(
        input=input_uri,
        output=output,
        backend="onnx",
        model=model,
        settings=load_job_settings(
            **{"batch_size": 16, "decode_batch_size": 8, "actor_num_cpus": 0.5, **settings}
        ),
    )


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    """3 episodes x 3 tracks x 12 frames, with pass-through columns of four Arrow types."""
    return make_synthetic_manifest(tmp_path_factory.mktemp("synthetic"), faces=108, episodes=3, tracks=3)


def _uids(table: pa.Table) -> list[str]:
    return pc.binary_join_element_wise(
        table["episode_id"], table["track_id"], table["frame"], "/"
    ).to_pylist()


def _held_manifest(synthetic, root: Path, bucket: str, s3_endpoint: str) -> str:
    """The synthetic manifest with its last row (of ``HELD``) read from the real S3 server: a
    copy of the same image bytes, so the vectors are the same."""
    import boto3

    table = pq.read_table(synthetic.manifest)
    assert table["episode_id"][-1].as_py() == HELD
    last = table["path"][-1].as_py()
    s3 = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    s3.create_bucket(Bucket=bucket)
    s3.upload_file(str(Path(synthetic.manifest).parent / last), bucket, last)
    paths = table["path"].to_pylist()
    paths[-1] = f"s3://{bucket}/{last}"
    manifest = root / "manifest" / "manifest.parquet"
    shutil.copytree(Path(synthetic.manifest).parent, manifest.parent)
    pq.write_table(table.set_column(table.schema.get_field_index("path"), "path", pa.array(paths)), manifest)
    return str(manifest)


@pytest.fixture(scope="module")
def watched(ray_local, synthetic, s3_endpoint, tmp_path_factory):
    """One job (Lance store on, min_quality and best-k set) whose last episode cannot commit while
    the read of its last row is held at the store (tests/helpers/s3_gate.py), until the test has
    read what committed meanwhile, and progress.json as it was then."""
    import ray
    from s3_gate import S3Gate

    root = tmp_path_factory.mktemp("watched")
    out, store = str(root / "out"), str(root / "store")
    bucket = f"held-{uuid.uuid4().hex[:12]}"
    manifest = _held_manifest(synthetic, root, bucket, s3_endpoint)
    norms_floor = 1.0
    # 48-row decode blocks (8 x decode_batch_size): the held row's block, [96, 108), is HELD's
    # alone, so the episodes before it commit while it waits
    job = spec(
        manifest,
        out,
        lance_uri=store,
        min_quality=norms_floor,
        max_crops_per_track=5,
        progress_interval_s=0.2,
        lance_commit_interval_s=0.0,
        decode_batch_size=6,
        read_timeout_s=0.0,
    )
    ctx = ray.data.DataContext.get_current()
    before = ctx.execution_options.preserve_order
    ctx.execution_options.preserve_order = True  # the held episode's blocks come after the others'
    gate = S3Gate(s3_endpoint)
    gate.hold(f"^/{bucket}/", method="GET")
    box: dict = {}
    seen: dict = {}
    with pytest.MonkeyPatch.context() as env:
        env.setenv("ARCFACE_STORAGE__ENDPOINT_URL", gate.url)
        thread = threading.Thread(target=lambda: box.update(report=run_job(job)), daemon=True)
        thread.start()
        try:
            gate.wait_held(400)

            def committed_and_reported() -> bool:
                # progress.json is rewritten on its own clock and may lag the commits: while the
                # held episode waits there is time for it to catch up, so wait for it, not race it
                progress = _read_progress(Path(out) / "progress.json")
                return len(committed_episodes(out)) >= 2 and progress.get("episodes_committed", 0) >= 1

            wait_for("two episodes committed and reported", committed_and_reported, timeout_s=400)
            seen = {
                "episodes": committed_episodes(out),
                "rows": read_committed(out),
                "alive": thread.is_alive(),
                "progress": _read_progress(Path(out) / "progress.json"),
                "store": _store_rows(store),
            }
        finally:
            gate.release()
            thread.join(600)
            gate.close()
            ctx.execution_options.preserve_order = before
    assert "report" in box, "the job did not finish"
    return {"out": out, "store": store, "report": box["report"], "seen": seen, "policy": job.settings}


def _read_progress(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def _store_rows(store: str) -> int:
    path = Path(store) / "faces.lance"
    return lancedb.connect(store).open_table("faces").count_rows() if path.exists() else 0


def test_an_episode_committed_while_the_job_runs_is_readable(watched, synthetic):
    seen = watched["seen"]
    assert seen, "no episode was committed while the held one was still embedding"
    assert seen["alive"] and HELD not in seen["episodes"], seen["episodes"]
    manifest = pq.read_table(synthetic.manifest)
    for ep in seen["episodes"]:  # complete, not a partial write
        rows = seen["rows"].filter(pc.equal(seen["rows"]["episode_id"], ep))
        expected = manifest.filter(pc.equal(manifest["episode_id"], ep))
        assert sorted(_uids(rows)) == sorted(_uids(expected))
    assert seen["progress"]["state"] == "running"
    # progress.json is rewritten on its own clock: it may lag the commits, never lead them
    assert 1 <= seen["progress"]["episodes_committed"] <= len(seen["episodes"]) < 3
    assert set(seen["progress"]["committed"]) <= set(seen["episodes"])


def test_progress_json_is_updated_during_the_run_and_final_at_the_end(watched, synthetic):
    running = watched["seen"]["progress"]
    assert running["state"] == "running" and running["rows_total"] == synthetic.faces
    assert 0 < running["faces_embedded"] <= synthetic.faces and running["episodes_total"] == 3
    final = json.loads((Path(watched["out"]) / "progress.json").read_text())
    report = watched["report"]
    assert final["state"] == "done" and final["episodes_committed"] == 3 and final["eta_s"] == 0.0
    assert final["report"]["faces"] == report.faces == synthetic.faces
    assert final["faces_embedded"] == report.faces_embedded and sorted(final["committed"]) == [
        "ep0000",
        "ep0001",
        "ep0002",
    ]
    assert final["updated_at"] >= running["updated_at"]


def test_pass_through_columns_round_trip_into_parquet_and_lance(watched, synthetic):
    manifest = pq.read_table(synthetic.manifest)
    rows = read_committed(watched["out"])
    lance_rows = lancedb.connect(watched["store"]).open_table("faces").to_arrow()
    for table in (rows, lance_rows):
        assert table.num_rows == synthetic.faces and len(set(_uids(table))) == synthetic.faces
        for name in PASS_THROUGH:
            assert table.schema.field(name).type == manifest.schema.field(name).type, name
        got = dict(zip(_uids(table), table.select(list(PASS_THROUGH)).to_pylist(), strict=True))
        want = dict(zip(_uids(manifest), manifest.select(list(PASS_THROUGH)).to_pylist(), strict=True))
        assert got == want
    assert rows["source"][0].as_py().startswith("pool/")
    # the same vectors in both sinks
    order = {u: i for i, u in enumerate(_uids(lance_rows))}
    idx = [order[u] for u in _uids(rows)]
    np.testing.assert_array_equal(_matrix(rows, "embedding"), _matrix(lance_rows, "embedding")[idx])


def _matrix(table: pa.Table, column: str) -> np.ndarray:
    values = table[column].combine_chunks()
    return values.flatten().to_numpy().reshape(len(values), -1)


def test_quality_settings_flag_each_row_and_shape_the_templates(watched):
    s = watched["policy"]
    policy = TemplatePolicy.of(s)
    rows = read_committed(watched["out"])
    templates = read_committed(watched["out"], "templates")
    assert templates.num_rows == 9
    for ep in ("ep0000", "ep0001", "ep0002"):
        r = rows.filter(pc.equal(rows["episode_id"], ep))
        expected = counted_crops(
            r["track_id"].to_numpy(zero_copy_only=False),
            r["frame"].to_numpy(zero_copy_only=False),
            r["norm"].to_numpy(),
            policy,
        )
        assert r["in_template"].to_pylist() == expected.tolist()
        emb, norms = _matrix(r, "embedding"), r["norm"].to_numpy()
        for t in templates.filter(pc.equal(templates["episode_id"], ep)).to_pylist():
            sel = expected & (r["track_id"].to_numpy(zero_copy_only=False) == t["track_id"])
            assert t["crops_used"] == sel.sum() <= s.max_crops_per_track
            want = (emb[sel] * norms[sel][:, None]).sum(0)
            np.testing.assert_allclose(t["template"], want / np.linalg.norm(want), atol=1e-5)
    assert sum(rows["in_template"].to_pylist()) == sum(templates["crops_used"].to_pylist()) == 9 * 5


def test_lance_top_k_returns_the_tracks_a_brute_force_search_over_parquet_finds(watched):
    """The README's query (nearest tracks to a face, across all episodes) against numpy over the
    Parquet templates; the store holds each track once, with its index built."""
    db = lancedb.connect(watched["store"])
    tracks = db.open_table("tracks")
    assert tracks.count_rows() == 9 and tracks.list_indices(), "no ANN index on the templates"
    templates = read_committed(watched["out"], "templates").filter(
        pc.is_valid(read_committed(watched["out"], "templates")["template"])
    )
    names = [
        f"{e}/{t}"
        for e, t in zip(templates["episode_id"].to_pylist(), templates["track_id"].to_pylist(), strict=True)
    ]
    matrix = _matrix(templates, "template")
    faces = read_committed(watched["out"])
    for i in range(0, faces.num_rows, 17):
        face = np.asarray(faces["embedding"][i].as_py(), np.float32)
        hits = (
            tracks.search(face, vector_column_name="template")
            .distance_type("cosine")
            .nprobes(64)
            .limit(5)
            .to_arrow()
        )
        got = [
            f"{e}/{t}"
            for e, t in zip(hits["episode_id"].to_pylist(), hits["track_id"].to_pylist(), strict=True)
        ]
        scores = matrix @ face
        want = [names[j] for j in np.argsort(-scores, kind="stable")[:5]]
        # The same tracks in the same order, up to near-ties (synthetic weights put some tracks
        # within float rounding of each other): each hit scores what the brute-force rank says.
        got_scores = np.array([scores[names.index(n)] for n in got])
        np.testing.assert_allclose(
            got_scores, np.sort(scores)[::-1][:5], atol=1e-5, err_msg=f"{i}: {got} vs {want}"
        )
        assert len(set(got)) == 5
        np.testing.assert_allclose(
            hits["_distance"].to_numpy(), 1 - np.sort(-(matrix @ face))[:5] * -1, atol=1e-4
        )
    assert watched["report"].lance["tracks_indexed"] == 9
    assert db.open_table("episodes").count_rows() == 3


def test_a_store_of_another_contract_is_refused_before_any_work(watched, synthetic, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(ConfigError, match=r"holds embedding contract .* this run uses contract"):
        run_job(
            spec(synthetic.manifest, str(out), model="synthetic:mobilefacenet@7", lance_uri=watched["store"])
        )
    assert not out.exists() or not list(out.rglob("*.parquet"))
    (tmp_path / "foreign" / "t.lance").mkdir(parents=True)
    (tmp_path / "foreign" / "t.lance" / "x").write_text("a Lance table of someone else's")
    with pytest.raises(ConfigError, match=r"no _arcface_store\.json"):
        run_job(spec(synthetic.manifest, str(out), lance_uri=str(tmp_path / "foreign")))


def test_an_append_cut_short_is_undone_and_the_store_backfilled_from_parquet(watched, synthetic, tmp_path):
    """A store whose last append lost its ``episodes`` rows (the driver died between them) and a
    leftover ``_pending.json``: the next run removes that episode's rows and appends them again,
    from the committed Parquet files, once."""
    import shutil

    import lance

    store = tmp_path / "store"
    shutil.copytree(watched["store"], store)
    out = tmp_path / "out"
    shutil.copytree(watched["out"], out)
    lance.dataset(str(store / "episodes.lance")).delete("episode_id = 'ep0001'")
    (store / "_pending.json").write_text(json.dumps({"episodes": ["ep0001"]}))
    report = run_job(spec(synthetic.manifest, str(out), lance_uri=str(store)))
    assert report.rows_processed == 0 and report.lance["episodes_backfilled"] == 1
    faces = lancedb.connect(str(store)).open_table("faces").to_arrow()
    assert faces.num_rows == synthetic.faces and len(set(_uids(faces))) == synthetic.faces
    assert lancedb.connect(str(store)).open_table("tracks").count_rows() == 9
    assert not (store / "_pending.json").exists()
