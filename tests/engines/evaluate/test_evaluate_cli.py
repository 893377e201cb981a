"""``arcface evaluate`` end to end on real faces: identities made of jittered copies of the faces
the insightface package ships (synthetic weights: the figures show the plumbing, not accuracy)."""

from __future__ import annotations

import json
import subprocess
import sys

import cv2
import numpy as np
import pytest
from support import run_main

from engines import jitter_face, source_faces
from engines.cli import main as cli_main

pytestmark = pytest.mark.slow  # spawns the CLI


def _identity_dir(root, per_identity: int = 4, seed: int = 0):
    rng = np.random.default_rng(seed)
    for face in source_faces():
        folder = root / face.name.replace(" ", "_")
        folder.mkdir(parents=True)
        for k in range(per_identity):
            cv2.imwrite(str(folder / f"{k}.png"), jitter_face(face, rng, strength=0.7))
    return root


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "engines", "evaluate", *args], capture_output=True,
                          text=True, timeout=600)


def test_evaluate_a_directory_and_compare_two_precisions(tmp_path):
    faces = _identity_dir(tmp_path / "faces")
    plot = tmp_path / "roc.png"
    proc = _run("--faces", str(faces), "--model", "synthetic:mobilefacenet", "--backend", "onnx",
                "--precision", "fp32", "--compare", "onnx:fp16", "--bootstrap", "200", "--plot", str(plot),
                "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["faces"] == 7 * 4 and report["identities"] == 7 and report["synthetic"]
    first, second = report["engines"]
    assert first["metrics"]["genuine"] == 7 * 6 and first["metrics"]["impostors"] == 7 * 6
    assert first["engine"]["contract"] == second["engine"]["contract"]
    for result in report["engines"]:
        m = result["metrics"]
        assert 0.5 < m["roc_auc"] <= 1.0 and 0.0 <= m["eer"]["rate"] < 0.5
        assert len(m["accuracy_kfold"]["folds"]) == 10
    metrics = {d["metric"] for d in report["deltas"]}
    assert {"accuracy", "roc_auc", "tar@far=0.01"} <= metrics
    for d in report["deltas"]:
        assert d["ci_low"] <= d["delta"] <= d["ci_high"]
    assert plot.stat().st_size > 1000


def test_evaluate_a_pairs_file_with_landmark_sidecars(tmp_path):
    rng = np.random.default_rng(1)
    faces = source_faces()
    rows = ["a,b,same"]
    for i, face in enumerate(faces):
        for k in range(2):  # each face twice, as un-aligned images with their landmarks
            name = f"f{i}_{k}.jpg"
            cv2.imwrite(str(tmp_path / name), face.image)
            kps = face.landmarks + rng.normal(0, 0.5, (5, 2))
            (tmp_path / (name + ".json")).write_text(json.dumps({"landmarks": kps.tolist()}))
        rows.append(f"f{i}_0.jpg,f{i}_1.jpg,1")
        rows.append(f"f{i}_0.jpg,f{(i + 1) % len(faces)}_1.jpg,0")
    (tmp_path / "pairs.csv").write_text("\n".join(rows) + "\n")
    proc = _run("--pairs", str(tmp_path / "pairs.csv"), "--model", "synthetic:mobilefacenet",
                "--backend", "onnx", "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    m = report["engines"][0]["metrics"]
    assert m["pairs"] == 2 * len(faces) and m["genuine"] == len(faces)
    assert m["genuine_mean"] > m["impostor_mean"]


@pytest.mark.parametrize(("args", "message"), [
    (["--faces", "/nonexistent"], "is not a directory"),
    (["--pairs", "/nonexistent.csv"], "pairs file"),
    (["--faces", "."], "at least 2 identities"),
])
def test_bad_input_exits_2_with_a_message(args, message):
    # refused before any work, in this process (the other tests run the real console script)
    proc = run_main(cli_main, ["evaluate", *args, "--model", "synthetic:mobilefacenet"])
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr[-2000:]
