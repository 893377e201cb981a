"""The episode job on a real local Ray: outputs, errors, resume, killed actor, crashed driver, S3."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from data_jobs.embed_episodes import JobSpec, inprocess_reference, run_job
from data_jobs.sample import make_sample_episodes
from data_jobs.settings import load_job_settings
from data_jobs.sources import discover
from data_jobs.storage import locate
from engines import get_engine
from engines.base.align import norm_crop

pytestmark = pytest.mark.integration

MODEL = "synthetic:mobilefacenet"


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    root = tmp_path_factory.mktemp("episodes")
    return make_sample_episodes(root, episodes=2, tracks=3, frames=6, corrupt=2)


@pytest.fixture(scope="module")
def engine(mbf_model):
    return get_engine("onnx", mbf_model)


def spec(input_uri: str, output: str, **settings) -> JobSpec:
    return JobSpec(input=input_uri, output=output, backend="onnx", model=MODEL,
                   settings=load_job_settings(**{"batch_size": 16, "decode_batch_size": 8, **settings}))


def read_rows(output: str):
    return pads.dataset(f"{output}/embeddings", format="parquet", partitioning="hive").to_table()


def assert_exactly_once(rows, sample) -> None:
    keys = pc.binary_join_element_wise(rows["episode_id"], rows["track_id"], rows["frame"], "/")
    assert rows.num_rows == sample.decodable
    assert len(pc.unique(keys)) == rows.num_rows


def snapshot(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


def test_directory_layout(ray_local, sample, engine, tmp_path):
    out = str(tmp_path / "out")
    report = run_job(spec(sample.directory, out))
    assert (report.faces, report.failures, report.episodes_committed) == (sample.decodable, sample.corrupt, 2)
    rows = read_rows(out)
    assert_exactly_once(rows, sample)
    assert rows.schema.field("embedding").type.list_size == 512
    assert set(rows["backend"].to_pylist()) == {"onnx"}
    # the job's vectors are the engine's vectors for the same crops
    paths = [f"{sample.directory}/{e}/{t}/{f}.jpg" for e, t, f in zip(
        rows["episode_id"].to_pylist(), rows["track_id"].to_pylist(), rows["frame"].to_pylist(), strict=True)]
    direct = engine.encode(np.stack([cv2.imread(p) for p in paths]))
    got = rows["embedding"].combine_chunks().flatten().to_numpy().reshape(-1, 512)
    assert (got * direct).sum(1).min() >= 0.99999
    norms = rows["norm"].to_numpy()
    np.testing.assert_allclose(norms, engine.encode_with_norms(np.stack([cv2.imread(p) for p in paths]))[1],
                               rtol=1e-4)
    errors = pq.read_table(f"{out}/errors")
    assert errors.num_rows == sample.corrupt
    assert all("not a decodable image" in e for e in errors["error"].to_pylist())
    templates = pq.read_table(f"{out}/templates")
    assert templates.num_rows == 2 * 3 and sum(templates["frame_count"].to_pylist()) == sample.decodable
    tpl = templates["template"].combine_chunks().flatten().to_numpy().reshape(-1, 512)
    np.testing.assert_allclose(np.linalg.norm(tpl, axis=1), 1.0, atol=1e-5)
    success = json.loads((Path(out) / "embeddings" / "episode_id=ep000" / "_SUCCESS").read_text())
    assert success["rows"] + success["errors"] == success["inputs"]
    assert success["engine"]["backends"] == ["onnx"] and success["contract"] == engine.info.contract

    before = snapshot(Path(out))
    again = run_job(spec(sample.directory, out))
    assert (again.episodes_skipped, again.rows_processed, again.faces) == (2, 0, 0)
    assert snapshot(Path(out)) == before, "a second run must write nothing"


def test_manifest_layout_with_inline_images_and_landmarks(ray_local, sample, engine, tmp_path):
    out = str(tmp_path / "out")
    report = run_job(spec(sample.manifest, out))
    assert (report.faces, report.failures) == (sample.decodable, sample.corrupt)
    rows = read_rows(out)
    assert_exactly_once(rows, sample)
    manifest = pq.read_table(sample.manifest)
    key = lambda e, t, f: f"{e}/{t}/{f}"  # noqa: E731
    columns = (rows["episode_id"].to_pylist(), rows["track_id"].to_pylist(), rows["frame"].to_pylist())
    by_key = {key(*r): i for i, r in enumerate(zip(*columns, strict=True))}
    got = rows["embedding"].combine_chunks().flatten().to_numpy().reshape(-1, 512)
    crops, idx = [], []
    base = Path(sample.manifest).parent
    for r in manifest.to_pylist():
        k = key(r["episode_id"], r["track_id"], r["frame"])
        if k not in by_key:
            continue
        if r["image"] is not None:
            crops.append(cv2.imdecode(np.frombuffer(r["image"], np.uint8), cv2.IMREAD_COLOR))
        else:
            frame = cv2.imread(str(base / r["path"]))
            crops.append(norm_crop(frame, np.asarray(r["kps"], np.float32).reshape(5, 2)))
        idx.append(by_key[k])
    assert len(idx) == sample.decodable
    assert (got[idx] * engine.encode(np.stack(crops))).sum(1).min() >= 0.99999
    # --compare-inprocess reads the same manifest whole (inline bytes, paths, corrupt rows)
    assert inprocess_reference(spec(sample.manifest, out), discover(locate(sample.manifest)), 8) > 0


def test_killed_actor_mid_job_still_yields_every_row_exactly_once(ray_local, sample, tmp_path):
    out, marker = str(tmp_path / "out"), tmp_path / "actor-killed"
    job = spec(sample.directory, out, batch_size=4)
    fault = {"kill_actor_after_batches": 2, "kill_actor_marker": str(marker)}
    job = JobSpec(**{**job.__dict__, "fault": fault})
    report = run_job(job)
    assert marker.exists(), "the fault was not injected: the test proves nothing"
    assert report.faces == sample.decodable and report.failures == sample.corrupt
    assert_exactly_once(read_rows(out), sample)


def test_crashed_driver_resumes_without_loss_or_duplicates(sample, tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "data_jobs.embed_episodes", "--input", sample.directory,
           "--output", str(out), "--backend", "onnx", "--model", MODEL, "--batch-size", "4"]
    env = {**os.environ, "RAY_ADDRESS": ""}
    crashed = subprocess.run([*cmd, "--inject-crash-driver-after-files", "2"], capture_output=True, text=True,
                             timeout=600, env=env)
    assert crashed.returncode == -9, crashed.stderr[-2000:]  # SIGKILL, mid-job
    staged = list((out / "_staging").rglob("*.parquet"))
    assert staged, "nothing was staged before the crash"
    done = subprocess.run([*cmd, "--json"], capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    total = sample.decodable + sample.corrupt
    assert report["rows_processed"] < total, "the resumed run recomputed rows that were already staged"
    assert_exactly_once(read_rows(str(out)), sample)
    assert pq.read_table(out / "errors").num_rows == sample.corrupt
    assert not list((out / "_staging").rglob("*.parquet"))


def test_s3_input_and_output(ray_local, sample, s3_endpoint, monkeypatch, tmp_path):
    import boto3

    monkeypatch.setenv("ARCFACE_STORAGE__ENDPOINT_URL", s3_endpoint)
    s3 = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    s3.create_bucket(Bucket="frames")
    root = Path(sample.directory)
    for path in root.rglob("*.jpg"):
        s3.upload_file(str(path), "frames", f"episodes/{path.relative_to(root)}")
    report = run_job(spec("s3://frames/episodes", "s3://frames/out"))
    assert report.faces == sample.decodable and report.failures == sample.corrupt
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket="frames", Prefix="out/")["Contents"]]
    assert "out/embeddings/episode_id=ep000/_SUCCESS" in keys
    fs = locate("s3://frames/out", s3_endpoint).fs
    rows = pads.dataset("frames/out/embeddings", filesystem=fs, format="parquet",
                        partitioning="hive").to_table()
    assert_exactly_once(rows, sample)

    # a local manifest whose rows point into the bucket: reached through the same endpoint
    files = sorted(root.rglob("*.jpg"))
    parts = [p.relative_to(root).parts for p in files]
    manifest = tmp_path / "manifest.parquet"
    pq.write_table(pa.table({
        "episode_id": [p[0] for p in parts], "track_id": [p[1] for p in parts],
        "frame": [p[2].rsplit(".", 1)[0] for p in parts],
        "path": [f"s3://frames/episodes/{'/'.join(p)}" for p in parts],
    }), manifest)
    report = run_job(spec(str(manifest), str(tmp_path / "out-manifest")))
    assert report.faces == sample.decodable and report.failures == sample.corrupt
    assert_exactly_once(read_rows(str(tmp_path / "out-manifest")), sample)


def test_bad_job_input_exits_2_with_a_message(sample, tmp_path):
    base = [sys.executable, "-m", "data_jobs.embed_episodes", "--output", str(tmp_path / "o")]
    cases = [
        (["--input", str(tmp_path / "missing")], "does not exist"),
        (["--input", sample.directory, "--concurrency", "3,1"], "MIN <= MAX"),
        (["--input", sample.directory, "--model", "synthetic:resnet9"], "unknown synthetic architecture"),
    ]
    for extra, message in cases:
        proc = subprocess.run([*base, *extra], capture_output=True, text=True, timeout=300)
        assert proc.returncode == 2, (extra, proc.stderr[-2000:])
        assert message in proc.stderr


def test_other_contract_in_output_is_refused(ray_local, sample, tmp_path):
    out = str(tmp_path / "out")
    small = make_sample_episodes(tmp_path / "one", episodes=1, tracks=1, frames=2)
    run_job(spec(small.directory, out))
    other = JobSpec(input=small.directory, output=out, backend="onnx", model="synthetic:mobilefacenet@7",
                    settings=load_job_settings())
    with pytest.raises(Exception, match="contract"):
        run_job(other)
    assert discover(locate(small.directory)).table.num_rows == 2
