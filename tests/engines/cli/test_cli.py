"""The ``arcface`` command as users run it: a real subprocess, JSON on the last line."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow  # every test here spawns a process


def run_cli(*args: str, check: bool = False) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "-m", "engines", *args], capture_output=True, text=True, timeout=600
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"arcface {args} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


def last_json(proc: subprocess.CompletedProcess) -> dict:
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_models_make_prints_path_and_sha(mbf_model):
    proc = run_cli("models", "make", "synthetic:mobilefacenet", check=True)
    assert mbf_model.path in proc.stdout and mbf_model.sha256 in proc.stdout
    assert "GMAC" in proc.stdout and "synthetic" in proc.stdout
    out = last_json(run_cli("models", "make", "synthetic:mobilefacenet", "--json", check=True))
    assert out["sha256"] == mbf_model.sha256 and out["synthetic"] is True


def test_compare_onnx_vs_insightface_on_iresnet50():
    proc = run_cli(
        "compare", "--backend-a", "onnx", "--backend-b", "insightface",
        "--model", "synthetic:iresnet50", "--n-samples", "64", "--json", check=True,
    )
    out = last_json(proc)
    assert out["min_cosine_sim"] >= 0.99999
    assert out["passed"] is True and out["n_samples"] == 64
    for key in ("mean_cosine_sim", "p01_cosine_sim", "max_drift_face_idx", "decision_flip_rate",
                "max_drift"):
        assert key in out


def test_info_prints_diagnostics():
    out = last_json(run_cli("info", "--backend", "onnx", "--model", "synthetic:mobilefacenet",
                            check=True))
    for key in ("backend", "engine_path", "precision", "batch_size", "embedding_dim", "device",
                "model_sha256", "contract"):
        assert key in out
    assert out["backend"] == "onnx" and out["embedding_dim"] == 512


def test_bench_side_by_side_json():
    proc = run_cli(
        "bench", "--backends", "insightface,onnx", "--model", "synthetic:mobilefacenet",
        "--batch-size", "8", "--num-faces", "32", "--rounds", "2", "--json", check=True,
    )
    results = last_json(proc)["results"]
    assert [r["backend"] for r in results] == ["insightface", "onnx"]
    for r in results:
        assert r["throughput_fps"] > 0 and r["latency_ms_p99"] >= r["latency_ms_p50"] > 0
        assert r["peak_mem_mb"] > 0 and r["error"] is None
        assert r["mem_kind"] == ("device" if r["device"].startswith("cuda") else "rss")
        assert set(r) >= {"backend", "model", "precision", "batch_size", "throughput_fps",
                          "latency_ms_p50", "latency_ms_p99", "peak_mem_mb", "speedup"}
    assert results[0]["speedup"] == 1.0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("bench", "--backends", "onnx,trt"), "unknown backend 'trt'"),
        (("bench", "--batch-size", "0"), "positive integer"),
        (("info", "--backend", "onnx", "--model", "/nope.onnx"), "not a file"),
        (("compare", "--backend-a", "onnx", "--backend-b", "insightface", "--model",
          "synthetic:resnet9"), "unknown synthetic architecture"),
    ],
)
def test_bad_input_exits_2_with_a_message(args, message):
    proc = run_cli(*args)
    assert proc.returncode == 2
    assert message in proc.stderr


def test_failed_drift_gate_exits_1():
    proc = run_cli(
        "compare", "--backend-a", "onnx", "--backend-b", "insightface", "--model",
        "synthetic:mobilefacenet", "--n-samples", "8", "--max-drift", "-1", "--json",
    )
    # max drift -1 demands cosine >= 2: impossible, so the check fails, cleanly
    assert proc.returncode == 1
    assert last_json(proc)["passed"] is False


def test_building_the_parser_and_cpu_commands_never_import_ray():
    # every command used to pay for Ray: the embed-episodes subparser imported the job module,
    # whose staging sink imports ray.data
    code = (
        "import sys\n"
        "from engines.cli import build_parser, main\n"
        "parser = build_parser()\n"
        "args = parser.parse_args(['embed-episodes', '--input', 'in', '--output', 'out'])\n"
        "assert args.job_args == ['--input', 'in', '--output', 'out'], args\n"
        "for argv in (['models', 'make', '--help'], ['--help'], ['serve', '--help']):\n"
        "    try:\n"
        "        main(argv)\n"
        "    except SystemExit:\n"
        "        pass\n"
        "assert main(['models', 'make', 'synthetic:mobilefacenet', '--json']) == 0\n"
        "print('RAY-LOADED' if 'ray' in sys.modules else 'RAY-FREE')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "RAY-FREE"


def test_embed_episodes_arguments_still_reach_the_job_parser():
    proc = run_cli("embed-episodes", "--input", "nowhere")
    assert proc.returncode == 2
    assert "arcface embed-episodes" in proc.stderr and "--output" in proc.stderr
