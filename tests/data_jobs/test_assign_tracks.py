"""``assign-tracks`` on a real embedded sample episode set: labels, clusters, screen time, resume."""

from __future__ import annotations

import json
import os

import pyarrow.parquet as pq
import pytest
from identity_faces import JITTER, THRESHOLD, enroll_jitters
from support import run_main

from data_jobs.assign_tracks import AssignSpec, run_assign
from data_jobs.job import JobSpec, run_job
from data_jobs.reader import read_committed
from data_jobs.sample import make_sample_episodes
from data_jobs.settings import load_job_settings
from engines import ConfigError, VectorStore, get_engine, source_faces
from engines.cli import main as cli_main
from engines.identity.gallery import open_gallery_store

pytestmark = pytest.mark.integration

MODEL = "synthetic:mobilefacenet"
ENROLLED = range(2, 7)  # faces 0 and 1 stay unknown; each has two tracks in ep000
FPS = 4.0


def _source_of(episode: int, track: int) -> int:
    return (episode * 9 + track) % len(source_faces())  # make_sample_episodes' rule


@pytest.fixture(scope="module")
def embedded(ray_local, tmp_path_factory):
    root = tmp_path_factory.mktemp("assign")
    sample = make_sample_episodes(root / "sample", episodes=2, tracks=9, frames=4, jitter=JITTER,
                                  mirror=False)
    out = str(root / "out")
    run_job(JobSpec(input=sample.directory, output=out, backend="onnx", model=MODEL,
                    settings=load_job_settings(batch_size=16, decode_batch_size=8, actor_num_cpus=0.5)))
    engine = get_engine("onnx", MODEL, device="cpu")
    info = engine.info
    store = open_gallery_store(str(root / "gallery"), info.contract, info.model_id, info.embedding_dim)
    enroll_jitters(engine, store, ENROLLED)
    return root, out, str(root / "gallery")


def _spec(embedded, **kw) -> AssignSpec:
    _, out, gallery = embedded
    return AssignSpec(out, gallery, threshold=THRESHOLD, cluster_distance=1 - THRESHOLD, fps=FPS, **kw)


def test_tracks_are_labelled_and_unknowns_of_one_face_cluster_together(embedded):
    report = run_assign(_spec(embedded))
    assert report["episodes"] == 2 and report["assigned"] == 2
    table = pq.read_table(report["identities_file"]).to_pylist()
    assert len(table) == 18
    by_face: dict[tuple[str, int], set[str]] = {}
    for row in table:
        e, t = int(row["episode_id"][2:]), int(row["track_id"][5:])
        face = _source_of(e, t)
        if face in ENROLLED:
            assert (row["identity"], row["kind"]) == (source_faces()[face].name, "gallery"), row
            assert row["score"] >= THRESHOLD
        else:
            assert row["kind"] == "cluster" and row["identity"].startswith(f"unknown-{row['episode_id']}-")
            by_face.setdefault((row["episode_id"], face), set()).add(row["identity"])
    # each unknown face is one cluster per episode, and two faces are never the same cluster
    assert all(len(names) == 1 for names in by_face.values()), by_face
    assert len({next(iter(v)) for v in by_face.values()}) == len(by_face) == 4


def test_screen_time_matches_the_frames_of_each_identity(embedded):
    report = run_assign(_spec(embedded))
    rows = read_committed(embedded[1], columns=["episode_id", "track_id", "frame"]).to_pylist()
    identity = {(r["episode_id"], r["track_id"]): r["identity"]
                for r in pq.read_table(report["identities_file"]).to_pylist()}
    expected: dict[tuple[str, str], set[str]] = {}
    for r in rows:
        key = (r["episode_id"], identity[(r["episode_id"], r["track_id"])])
        expected.setdefault(key, set()).add(r["frame"])
    times = pq.read_table(report["screen_time_file"]).to_pylist()
    got = {(t["episode_id"], t["identity"]): t["frames"] for t in times}
    assert got == {k: len(v) for k, v in expected.items()}
    for t in times:
        assert t["seconds"] == pytest.approx(t["frames"] / FPS) and t["time_source"] == "frames"
        assert t["first_seen_s"] == 0.0 and t["last_seen_s"] == pytest.approx(3 / FPS)
    # ep001 holds face 2 in two tracks over the same frames: on screen once, not twice
    twice = next(t for t in times if t["episode_id"] == "ep001" and t["identity"] == source_faces()[2].name)
    assert twice["tracks"] == 2 and twice["frames"] == 4


def test_a_rerun_skips_done_episodes_and_other_settings_redo_them(embedded):
    first = run_assign(_spec(embedded))
    part = os.path.join(first["output"], "identities", "episode_id=ep000", "part-0.parquet")
    stamp = os.stat(part).st_mtime_ns
    again = run_assign(_spec(embedded))
    assert (again["assigned"], again["skipped"]) == (0, 2) and os.stat(part).st_mtime_ns == stamp
    redo = run_assign(_spec(embedded, across=True))
    assert redo["assigned"] == 2
    across = pq.read_table(redo["identities_file"]).to_pylist()
    face0 = {r["identity"] for r in across
             if _source_of(int(r["episode_id"][2:]), int(r["track_id"][5:])) == 0}
    assert len(face0) == 1 and next(iter(face0)).startswith("unknown-") and "-ep" not in next(iter(face0))
    with open(os.path.join(redo["output"], "identities", "episode_id=ep000", "_SUCCESS")) as fh:
        success = json.load(fh)
    assert success["settings"]["across"] is True


def test_a_gallery_of_another_contract_and_an_empty_output_are_refused(embedded, tmp_path):
    other = VectorStore(str(tmp_path / "other"), "arcemb-v1-someothermodel").open("synthetic-iresnet50", 512)
    with pytest.raises(ConfigError) as err:
        run_assign(AssignSpec(embedded[1], other.uri))
    assert "arcemb-v1-someothermodel" in str(err.value) and "arcemb-v1-fe8e" in str(err.value)
    with pytest.raises(ConfigError, match="no committed episode"):
        run_assign(AssignSpec(str(tmp_path / "empty"), other.uri))
    with pytest.raises(ConfigError, match="no gallery"):
        run_assign(AssignSpec(embedded[1], str(tmp_path / "nothing")))


@pytest.mark.slow  # spawns the CLI
def test_the_command_line_resumes_and_refuses_bad_input_with_exit_2(embedded, tmp_path):
    import subprocess
    import sys

    _, out, gallery = embedded
    run_assign(_spec(embedded))
    args = [sys.executable, "-m", "engines", "assign-tracks", "--embeddings", out, "--gallery", gallery,
            "--threshold", str(THRESHOLD), "--cluster-distance", str(1 - THRESHOLD), "--fps", str(FPS)]
    proc = subprocess.run([*args, "--json"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert (report["assigned"], report["skipped"], report["tracks"]) == (0, 2, 18)
    table = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert table.returncode == 0 and "seconds" in table.stdout and "unknown-ep000-0" in table.stdout
    for bad in (["--embeddings", str(tmp_path)], ["--fps", "0"], ["--fps", "inf"], ["--threshold", "3"]):
        proc = run_main(cli_main, [*args[3:], *bad])  # refused before any work: in this process
        assert proc.returncode == 2 and "error:" in proc.stderr, (bad, proc.stderr[-2000:])


def _damaged(out: str, tmp_path, name: str, damage) -> str:
    """A copy of the job's output with ``damage(root)`` done to it."""
    import shutil
    from pathlib import Path

    copy = Path(tmp_path) / name
    shutil.copytree(out, copy)
    damage(copy)
    return str(copy)


def _rewritten(table: str, episode: str, column: str, values):
    """A damage: ``column`` of ``table``'s part of ``episode`` replaced by ``values(old, pa)``."""
    def damage(root) -> None:
        import pyarrow as pa

        path = root / table / f"episode_id={episode}" / "part-0.parquet"
        data = pq.read_table(path)
        i = data.column_names.index(column)
        pq.write_table(data.set_column(i, column, values(data[column], pa)), path)
    return damage


def _scaled(column, pa):
    return pa.array([[v * 1000 for v in t] if t else t for t in column.to_pylist()], pa.list_(pa.float32()))


def _nan(column, pa):
    rows = column.to_pylist()
    rows[0] = [float("nan")] * len(rows[0])
    return pa.array(rows, pa.list_(pa.float32()))


def _short(column, pa):
    return pa.array([t[:128] if t else t for t in column.to_pylist()], pa.list_(pa.float32()))


def _no_templates_file(root) -> None:
    (root / "templates" / "episode_id=ep001" / "part-0.parquet").unlink()


def _success_without_contract(root) -> None:
    path = root / "embeddings" / "episode_id=ep000" / "_SUCCESS"
    manifest = json.loads(path.read_text())
    del manifest["contract"]
    path.write_text(json.dumps(manifest))


@pytest.mark.parametrize(("damage", "says"), [
    (_rewritten("templates", "ep000", "template", _scaled), "not unit length"),
    (_rewritten("templates", "ep000", "template", _nan), "NaN or infinite"),
    (_rewritten("templates", "ep000", "template", _short), "[128] values; the contract's dimension is 512"),
    (_rewritten("templates", "ep000", "contract", lambda old, pa: pa.array(["arcemb-v1-other"] * len(old))),
     "arcemb-v1-other"),
    (_no_templates_file, "episode ep001 is committed with"),
    (_success_without_contract, "episode ep000 names no embedding contract"),
    (_rewritten("embeddings", "ep001", "frame", lambda old, pa: pa.array(["frame-x"] * len(old))),
     "embeddings of episode ep001: screen time needs a timestamp column or integer"),
], ids=["scaled x1000", "NaN", "dimension 128", "foreign contract", "no templates file", "no contract",
        "frame ids not numbers"])
def test_a_damaged_embeddings_output_is_refused_before_any_work_naming_the_episode(embedded, tmp_path,
                                                                                   damage, says):
    _, out, gallery = embedded
    damaged = _damaged(out, tmp_path, "damaged", damage)
    with pytest.raises(ConfigError) as info:
        run_assign(AssignSpec(damaged, gallery, threshold=THRESHOLD, fps=FPS,
                              output=str(tmp_path / "assigned")))
    assert says in str(info.value), str(info.value)
    assert not (tmp_path / "assigned").exists()  # nothing written
