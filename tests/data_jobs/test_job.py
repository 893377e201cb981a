"""The episode job on a real local Ray: outputs, errors, resume, killed actor, crashed driver, S3,
and the hostile inputs of issue 18 (each an error row, or a refusal before any work)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import threading
import uuid
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
from processes import owner_of_port, sigkill, titled, wait_for
from support import run_main

from data_jobs import embed_episodes
from data_jobs.job import JobSpec, inprocess_reference, run_job
from data_jobs.reader import committed_episodes, read_committed
from data_jobs.sample import make_sample_episodes
from data_jobs.settings import load_job_settings
from data_jobs.sources import discover
from engines import ConfigError, get_engine, locate
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
    return read_committed(output)


def vectors(rows) -> dict[str, np.ndarray]:
    keys = pc.binary_join_element_wise(rows["episode_id"], rows["track_id"], rows["frame"], "/").to_pylist()
    emb = rows["embedding"].combine_chunks().flatten().to_numpy().reshape(-1, 512)
    return dict(zip(keys, emb, strict=True))


def assert_exactly_once(rows, sample, reference: dict[str, np.ndarray] | None = None) -> None:
    """Every decodable row once; with ``reference`` (a clean run), bit for bit its vectors."""
    keys = pc.binary_join_element_wise(rows["episode_id"], rows["track_id"], rows["frame"], "/")
    assert rows.num_rows == sample.decodable
    assert len(pc.unique(keys)) == rows.num_rows
    if reference is not None:
        got = vectors(rows)
        assert got.keys() == reference.keys()
        assert all(np.array_equal(got[k], reference[k]) for k in got), "vectors differ from a clean run"


@pytest.fixture(scope="module")
def clean_run(ray_local, sample, tmp_path_factory):
    """The directory layout embedded once, undisturbed: the reference the fault tests match."""
    out = str(tmp_path_factory.mktemp("clean") / "out")
    return out, run_job(spec(sample.directory, out))


def snapshot(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


def test_directory_layout(ray_local, sample, engine, clean_run):
    out, report = clean_run
    assert (report.faces, report.failures, report.episodes_committed) == (sample.decodable, sample.corrupt, 2)
    assert report.faces_embedded == report.faces and report.faces_per_s > 0
    # the shell's CPU by role, from the local cluster's own processes (their titles name the role)
    cpu = report.shell_cpu
    assert cpu["cpu_s"] > 0 and cpu["cpu_ms_per_face"] > 0 and cpu["faces_per_cpu_s"] > 0
    assert cpu["cpu_s_by_role"].get("embed_actors", 0) > 0, cpu
    assert cpu["cpu_s_by_role"].get("decode", 0) > 0, cpu
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
    errors = read_committed(out, "errors")
    assert errors.num_rows == sample.corrupt
    assert set(errors["reason"].to_pylist()) == {"not_an_image"}
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


def test_the_reader_sees_committed_episodes_only(clean_run, sample):
    out, _ = clean_run
    success = Path(out) / "embeddings" / "episode_id=ep001" / "_SUCCESS"
    marker = success.read_bytes()
    success.unlink()  # ep001's files are there, its commit is not (a crash, or a commit under way)
    try:
        everything = pads.dataset(f"{out}/embeddings", format="parquet", partitioning="hive").to_table()
        assert "ep001" in everything["episode_id"].to_pylist(), "the test must hide rows a glob would see"
        rows = read_committed(out)
        assert set(rows["episode_id"].to_pylist()) == {"ep000"}
        assert rows.num_rows == pc.sum(pc.equal(everything["episode_id"], "ep000")).as_py()
        assert set(read_committed(out, "templates")["episode_id"].to_pylist()) == {"ep000"}
        assert rows.schema.field("episode_id").type == pa.string()
    finally:
        success.write_bytes(marker)
    assert read_committed(out).num_rows == sample.decodable


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
    engine = inprocess_reference(spec(sample.manifest, out), discover(locate(sample.manifest)), 8)
    assert engine.faces > 0 and engine.cpu_s > 0 and engine.wall_s > 0


def test_compare_inprocess_splits_the_ratio_in_its_factors(ray_local, sample, tmp_path):
    """``--compare-inprocess``: the same engine's speed in this process, and the ratio's two factors
    from the job's own CPU (engines.bench.ratio): their product is the job's faces over the span
    its CPU was sampled on, which starts no later than the job's clock, so at most the ratio."""
    args = ["--input", sample.directory, "--output", str(tmp_path / "out"), "--backend", "onnx",
            "--model", MODEL]
    done = run_main(embed_episodes.main, [*args, "--compare-inprocess", "--json"])
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    parts, cpu = report["ratio_parts"], report["shell_cpu"]
    assert report["inprocess_fps"] > 0 and report["ratio_to_inprocess"] > 0
    assert parts["run_cpu_ms_per_face"] == pytest.approx(cpu["cpu_ms_per_face"], abs=1e-3)
    assert parts["run_cores_busy"] == cpu["cores_busy"] and parts["engine_cpu_ms_per_face"] > 0
    assert 0 < parts["engine_share_of_cpu"] * parts["cores_busy_ratio"] <= 1.05 * report["ratio_to_inprocess"]
    # without the workers' start-up the engine's share is larger (a long job's)
    assert parts["steady_engine_share_of_cpu"] >= parts["engine_share_of_cpu"]
    assert "why       engine share of the CPU" in done.stdout


def _uploaded(sample, s3_endpoint: str, bucket: str | None = None) -> str:
    """The sample's directory layout in a new bucket (``bucket``, or a fresh name) of the real S3
    server, under ``episodes/``; its URI."""
    import boto3

    bucket = bucket or f"episodes-{uuid.uuid4().hex[:12]}"
    s3 = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    s3.create_bucket(Bucket=bucket)
    root = Path(sample.directory)
    for path in root.rglob("*.jpg"):
        s3.upload_file(str(path), bucket, f"episodes/{path.relative_to(root)}")
    return f"s3://{bucket}/episodes"


def _hold_last_rows(gate, source: str, episodes: list[str]) -> None:
    """Hold every request for the last row, in the job's index order, of each of ``episodes``:
    its decode waits on the gate, so the episode can commit only once the test lets it."""
    index = discover(locate(source, gate.url)).table
    rows = zip(index["episode_id"].to_pylist(), index["path"].to_pylist(), strict=True)
    last = {ep: path for ep, path in rows if ep in episodes}
    assert sorted(last) == sorted(episodes)
    keys = [urlsplit(p).path if "://" in p else f"/{p}" for p in last.values()]
    gate.hold("|".join(re.escape(k) for k in keys), method="GET")


@contextmanager
def job_in_thread(job: JobSpec):
    """``run_job(job)`` on the session's Ray in a thread; yields a dict that gets its report."""
    box: dict = {}

    def run() -> None:
        try:
            box["report"] = run_job(job)
        except BaseException as exc:
            box["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield box
    finally:
        thread.join(600)
    assert not thread.is_alive(), "the job did not end"
    if "error" in box:
        raise box["error"]


def _embed_actors() -> list:
    return titled("EmbedActor")


def test_killed_actor_mid_job_still_yields_every_row_exactly_once(ray_local, sample, clean_run, s3_endpoint,
                                                                  s3_gate, monkeypatch, tmp_path):
    """SIGKILL of the embedding actor once it has embedded a whole episode (committed) while the
    other episode's last row is still being read: Ray starts a new actor for the rest, and every
    row lands once, with a clean run's vectors bit for bit."""
    source = _uploaded(sample, s3_endpoint)
    monkeypatch.setenv("ARCFACE_STORAGE__ENDPOINT_URL", s3_gate.url)
    _hold_last_rows(s3_gate, source, ["ep001"])
    out = str(tmp_path / "out")
    with job_in_thread(spec(source, out, batch_size=4, read_timeout_s=0.0)) as box:
        try:
            s3_gate.wait_held(300)
            wait_for("ep000 committed", lambda: "ep000" in committed_episodes(out))
            actors = wait_for("the embedding actor", _embed_actors)
            assert len(actors) == 1, actors
            killed = sigkill(actors[0])
        finally:
            s3_gate.release()
    report = box["report"]
    assert report.faces == sample.decodable and report.failures == sample.corrupt
    assert killed not in [p.pid for p in _embed_actors()]
    assert_exactly_once(read_rows(out), sample, vectors(read_rows(clean_run[0])))
    assert not (Path(out) / "_staging").exists()


def test_killed_commit_task_is_retried_and_commits_every_row_once(ray_local, sample, clean_run, s3_endpoint,
                                                                 s3_gate, monkeypatch):
    """The worker of an episode's commit task is SIGKILLed between its data files and its _SUCCESS
    (its PUT held at the store): Ray runs the task again, which rewrites the files and commits;
    every row once, with a clean run's vectors."""
    import boto3

    source = _uploaded(sample, s3_endpoint)
    bucket = urlsplit(source).netloc
    monkeypatch.setenv("ARCFACE_STORAGE__ENDPOINT_URL", s3_gate.url)
    s3_gate.hold(f"^/{bucket}/out/embeddings/episode_id=ep000/_SUCCESS$", method="PUT", times=1)
    out = f"s3://{bucket}/out"
    s3 = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")

    def keys(prefix: str) -> list[str]:
        return [o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", [])]

    with job_in_thread(spec(source, out)) as box:
        try:
            s3_gate.wait_held(300)
            ep000 = "out/embeddings/episode_id=ep000/"
            assert f"{ep000}part-0.parquet" in keys(ep000), "the data files come before the _SUCCESS"
            # the process that sent the held request: the commit task's worker, by its socket
            worker = owner_of_port(s3_gate.held_client_ports()[0])
            assert worker is not None and "commit_episode" in " ".join(worker.cmdline()), worker
            sigkill(worker)
        finally:
            s3_gate.release()
    report = box["report"]
    assert (report.faces, report.failures, report.episodes_committed) == (sample.decodable, sample.corrupt, 2)
    rows = read_committed(out, endpoint_url=s3_endpoint)
    assert_exactly_once(rows, sample, vectors(read_rows(clean_run[0])))
    assert not keys("out/_staging") and not [k for k in keys("out/") if k.endswith(".tmp")]


def _job_config(tmp_path: Path) -> str:
    """config/episodes.yaml with decode blocks of 8 rows, as ``spec`` runs the in-process jobs (a
    held row then holds its block alone, not the whole 38-row input), and no wall-clock limit on
    a read (a row held longer than ``read_timeout_s`` would become an error row: the test, not a
    clock, decides when the held read goes on). Decode tasks take a quarter CPU: a held one keeps
    its CPU, and with two held the actor (1), a staging write and a commit (1/4 each) must
    still fit the session's 2 CPUs, or the writes the test waits for never start."""
    import yaml

    from data_jobs.settings import DEFAULT_EPISODES_CONFIG

    config = yaml.safe_load(DEFAULT_EPISODES_CONFIG.read_text())
    config["episodes"].update(decode_batch_size=8, read_timeout_s=0, decode_num_cpus=0.25)
    path = tmp_path / "episodes.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def _driver(args: list[str], ray_address: str) -> subprocess.Popen:
    """The job's console entry in a real process of its own, joined to the session's Ray."""
    return subprocess.Popen([sys.executable, "-m", "data_jobs.embed_episodes", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "RAY_ADDRESS": ray_address})


def _kill_driver(driver: subprocess.Popen) -> str:
    driver.kill()
    _, stderr = driver.communicate(timeout=120)
    assert driver.returncode == -9, stderr[-2000:]
    return stderr


def test_driver_killed_after_an_episode_committed_resumes_exactly_once_in_parquet_and_lance(
        ray_local, sample, clean_run, s3_endpoint, s3_gate, monkeypatch, tmp_path):
    """SIGKILL of the driver once the first episode is committed while the other's last row is
    held at the store (so it cannot commit, and its Lance append is not made): the committed
    episode stays as it is, the resumed run embeds only the rest, and both sinks hold every row
    once, with a clean run's vectors."""
    import lancedb
    import ray

    source = _uploaded(sample, s3_endpoint)
    monkeypatch.setenv("ARCFACE_STORAGE__ENDPOINT_URL", s3_gate.url)
    _hold_last_rows(s3_gate, source, ["ep001"])
    out, store = tmp_path / "out", tmp_path / "store"
    args = ["--input", source, "--output", str(out), "--backend", "onnx", "--model", MODEL,
            "--batch-size", "4", "--job-config", _job_config(tmp_path), "--lance", str(store)]
    driver = _driver(args, ray.get_runtime_context().gcs_address)
    try:
        s3_gate.wait_held(300)
        wait_for("ep000 committed", lambda: committed_episodes(str(out)) or driver.poll() is not None)
        assert driver.poll() is None, driver.communicate()[1][-2000:]
        _kill_driver(driver)
    finally:
        driver.kill()
        s3_gate.release()
    first = read_committed(str(out))
    assert set(first["episode_id"].to_pylist()) == {"ep000"}
    progress = json.loads((out / "progress.json").read_text())
    assert progress["state"] == "running"  # a killed driver leaves the last running snapshot
    committed_files = {k: v for k, v in snapshot(out).items() if "ep000" in k and "_staging" not in k}
    # the resume is a driver in this process, on the session's Ray
    done = run_main(embed_episodes.main, [*args, "--json"])
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert (report["episodes_skipped"], report["episodes_committed"]) == (1, 1)
    assert {k: v for k, v in snapshot(out).items() if k in committed_files} == committed_files
    reference = vectors(read_rows(clean_run[0]))
    assert_exactly_once(read_rows(str(out)), sample, reference)
    faces = lancedb.connect(str(store)).open_table("faces").to_arrow()
    assert_exactly_once(faces, sample, reference)
    assert lancedb.connect(str(store)).open_table("tracks").count_rows() == 6
    assert json.loads((out / "progress.json").read_text())["state"] == "done"


def test_crashed_driver_resumes_without_loss_or_duplicates(ray_local, sample, clean_run, s3_endpoint, s3_gate,
                                                           monkeypatch, tmp_path):
    """SIGKILL of the driver mid-job (rows of both episodes staged, the last row of each held at
    the store, so neither committed), then: another model over its staging is refused (with the
    way out); the right one resumes, embeds only the missing rows (faces_per_s counts those),
    commits every row once with a clean run's vectors bit for bit, and cleans the staging and
    temporary files it made, nothing else; leftovers of a commit cut short are cleaned later."""
    import ray

    source = _uploaded(sample, s3_endpoint)
    monkeypatch.setenv("ARCFACE_STORAGE__ENDPOINT_URL", s3_gate.url)
    _hold_last_rows(s3_gate, source, ["ep000", "ep001"])
    out = tmp_path / "out"
    args = ["--input", source, "--output", str(out), "--backend", "onnx", "--batch-size", "4",
            "--job-config", _job_config(tmp_path)]

    def staged_files() -> list[Path]:
        return sorted((out / "_staging").rglob("*.parquet"))

    driver = _driver([*args, "--model", MODEL], ray.get_runtime_context().gcs_address)
    try:
        s3_gate.wait_held(300)
        wait_for("2 staged files", lambda: len(staged_files()) >= 2 or driver.poll() is not None)
        assert driver.poll() is None, driver.communicate()[1][-2000:]
        _kill_driver(driver)
    finally:
        driver.kill()
        s3_gate.release()
    assert not committed_episodes(str(out)), "an episode committed with its last row held"
    staged = staged_files()
    saved = {p: p.read_bytes() for p in staged}
    staged_good = sum(pc.sum(pc.equal(pq.read_table(p)["error"], "")).as_py() for p in staged)
    episode_dir = staged[0].parent
    foreign = episode_dir / "NOTES.txt"  # not the job's: must survive its clean-up
    foreign.write_text("keep me")
    orphan = episode_dir / f".{uuid.uuid4().hex}.tmp"  # a write the crash cut short
    orphan.write_bytes(b"partial")

    before = snapshot(out)
    # the later runs are drivers in this process (session's Ray)
    other = run_main(embed_episodes.main, [*args, "--model", "synthetic:mobilefacenet@7"])
    assert other.returncode == 2, other.stderr[-2000:]
    assert "interrupted run" in other.stderr and f"delete {out}/_staging" in other.stderr, other.stderr[-999:]
    assert "Traceback" not in other.stderr
    assert snapshot(out) == before, "a refused run must not touch the output"

    done = run_main(embed_episodes.main, [*args, "--model", MODEL, "--json"])
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    total = sample.decodable + sample.corrupt
    assert report["rows_processed"] < total, "the resumed run recomputed rows that were already staged"
    assert report["faces"] == sample.decodable
    assert report["faces_embedded"] == sample.decodable - staged_good
    assert report["faces_per_s"] == pytest.approx(report["faces_embedded"] / report["seconds"])
    assert_exactly_once(read_rows(str(out)), sample, vectors(read_rows(clean_run[0])))
    assert read_committed(str(out), "errors").num_rows == sample.corrupt
    assert not list((out / "_staging").rglob("*.parquet")) and not orphan.exists()
    assert foreign.read_text() == "keep me"

    # a commit cut short between _SUCCESS and its clean-up leaves staging behind: the next run
    # removes it (it is the job's own), and changes nothing else
    leftover, data = next(iter(saved.items()))
    leftover.write_bytes(data)
    committed = {k: v for k, v in snapshot(out).items() if not k.startswith("_staging")}
    again = run_main(embed_episodes.main, [*args, "--model", MODEL, "--json"])
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads(again.stdout.strip().splitlines()[-1])["rows_processed"] == 0
    assert not leftover.exists() and foreign.exists()
    assert {k: v for k, v in snapshot(out).items() if not k.startswith("_staging")} == committed


def test_s3_input_and_output(ray_local, sample, s3_endpoint, monkeypatch, tmp_path):
    import boto3

    monkeypatch.setenv("ARCFACE_STORAGE__ENDPOINT_URL", s3_endpoint)
    s3 = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    source = _uploaded(sample, s3_endpoint, "frames")
    root = Path(sample.directory)
    report = run_job(spec(source, "s3://frames/out", lance_uri="s3://frames/store"))
    assert report.faces == sample.decodable and report.failures == sample.corrupt
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket="frames", Prefix="out/")["Contents"]]
    assert "out/embeddings/episode_id=ep000/_SUCCESS" in keys and "out/progress.json" in keys
    assert not [k for k in keys if k.startswith("out/_staging") or k.endswith(".tmp")], keys
    rows = read_committed("s3://frames/out", endpoint_url=s3_endpoint)
    assert_exactly_once(rows, sample)
    progress = json.loads(s3.get_object(Bucket="frames", Key="out/progress.json")["Body"].read())
    assert progress["state"] == "done" and progress["episodes_committed"] == 2
    # the Lance store on S3, read with lancedb through the same endpoint
    import lancedb

    from engines.store.vector_store import lance_storage_options

    db = lancedb.connect("s3://frames/store", storage_options=lance_storage_options("s3://frames/store",
                                                                                     s3_endpoint, None))
    faces = db.open_table("faces").to_arrow()
    assert_exactly_once(faces, sample, vectors(rows))
    assert db.open_table("tracks").count_rows() == 6 and report.lance["tracks_indexed"] == 6

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

    # an output in a bucket that does not exist: refused before any work, not at the first write
    with pytest.raises(ConfigError, match="output s3://no-such-bucket/out is not writable"):
        run_job(spec(str(manifest), "s3://no-such-bucket/out"))


def _manifest(where: Path, **columns) -> str:
    pq.write_table(pa.table(columns), where)
    return str(where)


def test_bad_job_input_exits_2_with_a_message(sample, tmp_path):
    """Each refused before any work: exit 2, a message naming the problem, no traceback, and
    nothing written (a manifest id aiming the staging at a directory outside the output included)."""
    out = tmp_path / "o"
    base = [sys.executable, "-m", "data_jobs.embed_episodes", "--output", str(out)]
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "precious.txt").write_text("not the job's")
    ids = {"track_id": ["t"], "frame": ["1"]}
    non_utf8 = tmp_path / "non-utf8"
    shutil.copytree(Path(sample.directory) / "ep000", non_utf8 / "ep000")
    os.rename(non_utf8 / "ep000" / "track001", os.fsencode(non_utf8 / "ep000") + b"/track\xff")
    linked = tmp_path / "linked"
    shutil.copytree(Path(sample.directory) / "ep000", linked / "ep000")
    (linked / "ep001").symlink_to(linked / "ep000")
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    cases = [
        (["--input", str(tmp_path / "missing")], "does not exist"),
        (["--input", sample.directory, "--concurrency", "3,1"], "MIN <= MAX"),
        (["--input", sample.directory, "--model", "synthetic:resnet9"], "unknown synthetic architecture"),
        (["--input", _manifest(tmp_path / "escape.parquet", episode_id=["../../victim"], path=["x"], **ids)],
         "cannot be used as episode_id"),
        (["--input", _manifest(tmp_path / "empty.parquet", episode_id=pa.array([], pa.string()),
                               track_id=pa.array([], pa.string()), frame=pa.array([], pa.string()),
                               path=pa.array([], pa.string()))], "has no rows"),
        (["--input", _manifest(tmp_path / "text.parquet", episode_id=["e"], image=["not bytes"], **ids)],
         "column 'image' is string"),
        (["--input", str(non_utf8)], "ep000/track\\xff/00000.jpg"),
        (["--input", _manifest(tmp_path / "clash.parquet", episode_id=["e"], path=["x"], backend=["b"],
                               **ids)],
         "['backend'] would be overwritten by the job's own output columns"),
        (["--input", sample.directory, "--min-quality", "-1"], "episodes.min_quality: must be >= 0.0"),
        (["--input", str(linked)], "are the same directory"),
        (["--input", sample.directory, "--output", str(a_file)], "exists and is not a directory"),
    ]
    for i, (extra, message) in enumerate(cases):
        if i == 0:  # the console script's real exit code once; the other refusals in this process
            proc = subprocess.run([*base, *extra], capture_output=True, text=True, timeout=300)
        else:
            proc = run_main(embed_episodes.main, [*base[3:], *extra])
        assert proc.returncode == 2, (extra, proc.stderr[-2000:])
        assert message in proc.stderr and "Traceback" not in proc.stderr, (extra, proc.stderr[-2000:])
        assert not out.exists(), (extra, "a refused job wrote to its output")
    assert (victim / "precious.txt").read_text() == "not the job's"
    assert a_file.read_text() == "x"


@contextmanager
def read_only(path: Path):
    """``path`` made read-only for this process: mode 0555, and for root (whom modes do not stop)
    the immutable attribute; skips the test where neither holds."""
    path.mkdir()
    path.chmod(0o555)
    immutable = os.geteuid() == 0 and subprocess.run(["chattr", "+i", str(path)],
                                                     capture_output=True).returncode == 0
    try:
        probe = path / "probe"
        try:
            probe.write_text("x")
        except OSError:
            pass
        else:
            probe.unlink()
            pytest.skip("cannot make a read-only directory here")
        yield path
    finally:
        if immutable:
            subprocess.run(["chattr", "-i", str(path)], check=True)
        path.chmod(0o755)


def test_a_read_only_output_is_refused_before_any_work(sample, tmp_path):
    with read_only(tmp_path / "ro") as out:
        proc = subprocess.run([sys.executable, "-m", "data_jobs.embed_episodes", "--input", sample.directory,
                               "--output", str(out), "--backend", "onnx", "--model", MODEL],
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert f"output {out} is not writable" in proc.stderr and "nothing was run" in proc.stderr
        assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
        assert not list(out.iterdir())


@pytest.mark.filterwarnings("ignore:Corrupt EXIF data")
def test_hostile_files_are_error_rows_and_the_good_rows_commit(ray_local, sample, clean_run, hostile_inline,
                                                              tmp_path):
    """Crafted headers, a declared 20000x20000 PNG, an oversized file, a FIFO, a broken link and a
    device in the directory layout: one error row each, with its reason; every good row is
    committed, with a clean run's vectors bit for bit."""
    root = tmp_path / "episodes"
    shutil.copytree(sample.directory, root)
    track = root / "ep000" / "track001"
    expected = {}
    for i, (name, data, kps, reason, _) in enumerate(hostile_inline):
        if kps is None and isinstance(data, bytes):  # landmarks and typed values need a manifest
            (track / f"h{i:03d}.jpg").write_bytes(data)
            expected[f"h{i:03d}"] = (reason, name)
    os.mkfifo(track / "h901.jpg")
    (track / "h902.jpg").symlink_to(track / "gone.jpg")
    (track / "h903.jpg").symlink_to("/dev/zero")
    expected.update({"h901": ("not_a_file", "fifo"), "h902": ("not_a_file", "broken link"),
                     "h903": ("not_a_file", "device")})
    out = str(tmp_path / "out")
    report = run_job(spec(str(root), out, max_file_mb=0.0477))  # 50,000 bytes: the oversized row's limit
    assert report.failures == sample.corrupt + len(expected)
    errors = read_committed(out, "errors")
    got = {f: r for f, r in zip(errors["frame"].to_pylist(), errors["reason"].to_pylist(), strict=True)}
    for frame, (reason, name) in expected.items():
        assert got.get(frame) == reason, (name, got.get(frame))
    assert all(errors["error"].to_pylist()) and all(errors["source"].to_pylist())
    assert_exactly_once(read_rows(out), sample, vectors(read_rows(clean_run[0])))
    assert sum(read_committed(out, "templates")["frame_count"].to_pylist()) == sample.decodable


@pytest.mark.filterwarnings("ignore:Corrupt EXIF data")
def test_hostile_manifest_rows_are_error_rows_and_the_good_rows_commit(ray_local, sample, hostile_inline,
                                                                       stalled_s3, monkeypatch, tmp_path):
    """Inline crafted bytes, landmarks far outside / huge / fractions / miscounted, paths to a FIFO
    and a device, and an S3 object whose endpoint stalls: one error row each, in bounded time
    (read_timeout_s, not the hour-long stall timeout); every good row committed."""
    monkeypatch.setenv("ARCFACE_STORAGE__ENDPOINT_URL", stalled_s3)
    shutil.copytree(Path(sample.manifest).parent, tmp_path / "manifest")
    rows = pq.read_table(tmp_path / "manifest" / "manifest.parquet").to_pylist()
    os.mkfifo(tmp_path / "fifo.jpg")
    expected = {}
    hostile = [(name, data, kps, reason) for name, data, kps, reason, _ in hostile_inline
               if isinstance(data, bytes) and all(isinstance(v, float) for v in kps or [])]
    hostile += [("fifo", None, None, "not_a_file"), ("device", None, None, "not_a_file"),
                ("stalled", None, None, "read_timeout")]
    paths = {"fifo": str(tmp_path / "fifo.jpg"), "device": "/dev/zero", "stalled": "s3://bucket/stalled.jpg"}
    for i, (name, data, kps, reason) in enumerate(hostile):
        rows.append({"episode_id": "ep001", "track_id": "track002", "frame": f"h{i:03d}", "image": data,
                     "path": paths.get(name), "kps": kps})
        expected[f"h{i:03d}"] = (reason, name)
    manifest = tmp_path / "manifest" / "manifest.parquet"
    pq.write_table(pa.Table.from_pylist(rows, schema=pq.read_schema(manifest)), manifest)
    out = str(tmp_path / "out")
    report = run_job(spec(str(manifest), out, max_file_mb=0.0477, read_timeout_s=3.0))
    assert report.failures == sample.corrupt + len(expected)
    assert report.seconds < 600, "a stalled read held the job"
    errors = read_committed(out, "errors")
    got = {f: r for f, r in zip(errors["frame"].to_pylist(), errors["reason"].to_pylist(), strict=True)}
    for frame, (reason, name) in expected.items():
        assert got.get(frame) == reason, (name, got.get(frame))
    assert_exactly_once(read_rows(out), sample)


def test_other_contract_in_output_is_refused(ray_local, sample, tmp_path):
    out = str(tmp_path / "out")
    small = make_sample_episodes(tmp_path / "one", episodes=1, tracks=1, frames=2)
    run_job(spec(small.directory, out))
    other = JobSpec(input=small.directory, output=out, backend="onnx", model="synthetic:mobilefacenet@7",
                    settings=load_job_settings())
    with pytest.raises(Exception, match="contract"):
        run_job(other)
    assert discover(locate(small.directory)).table.num_rows == 2
