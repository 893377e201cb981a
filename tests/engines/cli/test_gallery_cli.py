"""``arcface gallery`` end to end: real faces, a real engine, a real Lance gallery on disk."""

from __future__ import annotations

import json
import subprocess
import sys

import cv2
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from identity_faces import gallery_dir, jitters
from support import CliResult, run_main

from engines import source_faces
from engines.cli import main as cli_main

pytestmark = pytest.mark.slow  # spawns the CLI

MODEL = ("--model", "synthetic:mobilefacenet", "--backend", "onnx")


def _run_script(*args: str) -> subprocess.CompletedProcess:
    """``arcface gallery`` as users run it: a real subprocess (once per test module's main path)."""
    return subprocess.run([sys.executable, "-m", "engines", "gallery", *args], capture_output=True, text=True,
                          timeout=300)


def _run(*args: str) -> CliResult:
    """``arcface gallery`` in this process: the same ``main``, without seconds of imports per call."""
    return run_main(cli_main, ["gallery", *args])


def _last_json(proc: subprocess.CompletedProcess | CliResult) -> dict:
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_enroll_ls_remove_and_another_contract_refused(tmp_path):
    faces = gallery_dir(tmp_path / "faces", range(3))
    gallery = str(tmp_path / "G")
    report = _last_json(_run_script("enroll", "--gallery", gallery, "--faces", str(faces), *MODEL, "--json"))
    assert report["faces"] == 9 and report["identities"] == 3
    again = _last_json(_run("enroll", "--gallery", gallery, "--faces", str(faces), *MODEL, "--json"))
    listing = _last_json(_run("ls", "--gallery", gallery, "--json"))
    assert again["identities"] == 3 and [r["members"] for r in listing["identities"]] == [3, 3, 3]
    assert listing["contract"] == report["contract"]

    other = _run("enroll", "--gallery", gallery, "--faces", str(faces), "--model", "synthetic:iresnet50",
                 "--backend", "onnx")
    assert other.returncode == 2
    assert report["contract"] in other.stderr and "synthetic-iresnet50" in other.stderr
    other_contract = [w for w in other.stderr.split() if w.startswith("arcemb-") and w != report["contract"]]
    assert other_contract, other.stderr

    name = source_faces()[1].name
    removed = _last_json(_run("remove", "--gallery", gallery, name, "--json"))
    assert removed["identities"] == 2
    missing = _run("remove", "--gallery", gallery, "nobody")
    assert missing.returncode == 2 and "not in gallery" in missing.stderr


def test_enroll_from_a_manifest_and_bad_inputs(tmp_path):
    rows = {"identity": [], "image": [], "path": []}
    for i in (0, 6):
        for k, crop in enumerate(jitters(i, 2, seed=i)):
            rows["identity"].append(source_faces()[i].name)
            if k == 0:
                rows["image"].append(cv2.imencode(".png", crop)[1].tobytes())
                rows["path"].append(None)
            else:
                cv2.imwrite(str(tmp_path / f"{i}.png"), crop)
                rows["image"].append(None)
                rows["path"].append(f"{i}.png")
    pq.write_table(pa.table({"identity": rows["identity"], "image": pa.array(rows["image"], pa.binary()),
                             "path": rows["path"]}), tmp_path / "m.parquet")
    manifest = str(tmp_path / "m.parquet")
    report = _last_json(_run("enroll", "--gallery", str(tmp_path / "G"), "--faces", manifest, *MODEL,
                             "--json"))
    assert report["faces"] == 4 and report["enrolled"] == sorted({source_faces()[0].name, "tom_hanks"})

    (tmp_path / "bad" / "x").mkdir(parents=True)
    (tmp_path / "bad" / "x" / "0.png").write_bytes(b"not an image")
    for faces in (tmp_path / "bad", tmp_path / "nowhere"):
        proc = _run("enroll", "--gallery", str(tmp_path / "G2"), "--faces", str(faces), *MODEL)
        assert proc.returncode == 2 and str(faces) in proc.stderr, proc.stderr[-2000:]
    assert _run("ls", "--gallery", str(tmp_path / "G3")).returncode == 2


def test_calibrate_reports_a_threshold_that_separates_the_jittered_identities(tmp_path):
    faces = gallery_dir(tmp_path / "cal", range(7), per_identity=3, seed=5)
    report = _last_json(_run("calibrate", "--faces", str(faces), *MODEL, "--far", "0.01", "--json"))
    point = report["thresholds"][0]
    assert report["synthetic"] and report["impostors"] == 7 * 6 // 2 * 9
    assert point["far"] <= 0.01 and point["tar"] >= 0.9  # jitter 0.05 keeps the margin (identity_faces)
