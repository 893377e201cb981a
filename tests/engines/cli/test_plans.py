"""``arcface build`` / ``arcface engines`` / ``arcface info`` on a host without TensorRT.

``build`` must fail in one line naming the extra; ``engines ls|pull|push``
need no GPU and move verified plans between the local cache and a real S3 API
server (moto on 127.0.0.1); the tensorrt backend in a chain yields to onnx
with its reason in ``info``.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from engines import cli
from engines.backends.tensorrt import TensorRTEngine
from engines.config import StorageConfig, TensorRTConfig
from engines.tensorrt.plan_cache import get_or_build_plan
from engines.tensorrt.plan_key import BuildTarget
from engines.tensorrt.runtime import tensorrt_installed

pytestmark = pytest.mark.slow  # every test here spawns a process

TARGET = BuildTarget((8, 6), "10.16.0.0", "simulated A10")


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "engines", *args], capture_output=True, text=True,
                          timeout=600)


@pytest.mark.skipif(tensorrt_installed(), reason="this host has TensorRT")
def test_build_without_tensorrt_fails_in_one_clear_line(mbf_model):
    proc = run_cli("build", "--onnx-path", mbf_model.path, "--precision", "fp16")
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 1
    assert len(lines) == 1, proc.stderr
    assert "tensorrt" in lines[0] and "pip install 'arcface-ray[gpu]'" in lines[0]
    assert proc.stdout == ""


@pytest.mark.skipif(TensorRTEngine.availability() is None, reason="TensorRT can run on this host")
def test_info_shows_tensorrt_yielding_to_onnx_and_the_onnxruntime_build():
    proc = run_cli("info", "--backend", "tensorrt", "--fallback", "onnx",
                   "--model", "synthetic:mobilefacenet")
    assert proc.returncode == 0, proc.stderr[-3000:]
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    assert info["backend"] == "onnx"
    first, last = info["fallback"]["attempts"][0], info["fallback"]["attempts"][-1]
    assert first["backend"] == "tensorrt" and first["status"] == "unavailable"
    assert "tensorrt" in first["reason"] and TensorRTEngine.availability() in first["reason"]
    assert last["backend"] == "onnx" and last["status"] == "selected"
    ort = info["onnxruntime"]
    assert ort["in_charge"] in ort["distributions"] and ort["available_providers"]


@pytest.fixture
def s3_env(monkeypatch, tmp_path, s3_endpoint, bucket):
    """Point the tensorrt engine store at the moto bucket via ARCFACE_* overrides."""
    for key, value in (("TYPE", "s3"), ("BUCKET", bucket), ("ENDPOINT_URL", s3_endpoint),
                       ("PREFIX", "team/engines")):
        monkeypatch.setenv(f"ARCFACE_TENSORRT__STORAGE__{key}", value)

    def use_cache(name: str) -> str:
        path = str(tmp_path / name)
        monkeypatch.setenv("ARCFACE_TENSORRT__STORAGE__CACHE_DIR", path)
        return path

    return use_cache


def _arcface(capsys, *argv: str) -> tuple[int, dict | None, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    lines = out.strip().splitlines()
    data = json.loads(lines[-1]) if "--json" in argv and code == 0 else None
    return code, data, err


def _plan_in_local_cache(mbf_model, cache_dir: str):
    def build(job):
        job.output_path.write_bytes(b"plan for " + job.key.encode() * 50)

    cfg = TensorRTConfig(precision="fp32", storage=StorageConfig(cache_dir=cache_dir))
    return get_or_build_plan(mbf_model, cfg, target=TARGET, build=build)


def test_engines_push_ls_pull_through_s3(mbf_model, s3_env, capsys):
    entry = _plan_in_local_cache(mbf_model, s3_env("host-a"))
    code, pushed, err = _arcface(capsys, "engines", "push", str(entry.path), "--json")
    assert code == 0, err
    assert pushed["key"] == entry.key and pushed["uri"].endswith("/team/engines/" + entry.key)

    s3_env("host-b")
    code, listed, err = _arcface(capsys, "engines", "ls", "--json")
    assert code == 0, err
    assert listed["local"] == []
    assert [(e["key"], e["complete"]) for e in listed["s3"]] == [(entry.key, True)]

    code, pulled, err = _arcface(capsys, "engines", "pull", entry.key, "--json")
    assert code == 0, err
    data = Path(pulled["path"]).read_bytes()
    assert data == entry.path.read_bytes() and hashlib.sha256(data).hexdigest() == pulled["sha256"]
    code, listed, _ = _arcface(capsys, "engines", "ls", "--json")
    assert [(e["key"], e["verified"]) for e in listed["local"]] == [(entry.key, True)]


def test_engines_refuse_bad_input_and_tampered_plans(mbf_model, s3_env, capsys):
    entry = _plan_in_local_cache(mbf_model, s3_env("host-a"))
    assert _arcface(capsys, "engines", "pull", "not-a-key")[0] == 2
    code, _, err = _arcface(capsys, "engines", "pull", entry.key.replace("fp32", "fp16"))
    assert code == 1 and "not published" in err
    entry.path.write_bytes(b"tampered")
    code, _, err = _arcface(capsys, "engines", "push", str(entry.path))
    assert code == 1 and "does not match its sidecar" in err
    entry.path.with_name(entry.key + ".json").unlink()
    code, _, err = _arcface(capsys, "engines", "push", str(entry.path))
    assert code == 2 and "sidecar" in err


def test_engines_pull_needs_an_s3_store(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("ARCFACE_TENSORRT__STORAGE__TYPE", "local")
    monkeypatch.setenv("ARCFACE_TENSORRT__STORAGE__CACHE_DIR", str(tmp_path))
    key = "m-0123abcd-fp16-sm89-d0a1b2c-trt10.16.0.0-cu12-b1_32_128.plan"
    code, _, err = _arcface(capsys, "engines", "pull", key)
    assert code == 2 and "tensorrt.storage.type" in err
