"""``scripts/shell_capacity.py`` without running the services: which command each path runs,
the cores-per-GPU arithmetic, the README section it writes, and bad arguments. (The commands
it drives are tested where they live: bench-serve in tests/serve_app/test_launch.py, the job
in tests/data_jobs.)"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("shell_capacity", ROOT / "scripts" / "shell_capacity.py")
shell_capacity = importlib.util.module_from_spec(_spec)
sys.modules["shell_capacity"] = shell_capacity
_spec.loader.exec_module(shell_capacity)


def _result(faces_per_cpu_s: float | None, startup_cpu_s: float = 0.0) -> dict:
    """A run of 1000 faces whose steady shell sustains ``faces_per_cpu_s``, plus workers starting
    (over 1000 faces, ``startup_cpu_s`` CPU-seconds are that many ms per face)."""
    shell = None
    if faces_per_cpu_s is not None:
        steady_ms = 1000 / faces_per_cpu_s
        all_ms = steady_ms + startup_cpu_s
        shell = {
            "cpu_ms_per_face": all_ms, "faces_per_cpu_s": 1000 / all_ms,
            "startup_cpu_s": startup_cpu_s, "steady_cpu_ms_per_face": steady_ms,
            "steady_faces_per_cpu_s": faces_per_cpu_s,
            "cpu_ms_per_face_by_role": {"replica": 0.5, "proxy": 0.3, "ray_system": 0.1,
                                        "serve_controller": 0.01, "worker_start": startup_cpu_s}}
    return {"faces": 1000, "faces_per_s": 500.0, "ratio_to_inprocess": 0.5, "shell_cpu": shell}


def test_each_service_path_runs_bench_serve_with_its_encodings():
    args = shell_capacity.parse_args(["--duration", "2", "--concurrency", "4"])
    npy = shell_capacity.serve_command("http-npy", args)
    assert npy[2:4] == ["engines", "bench-serve"] and "--start" in npy and npy[-4:] == [
        "--body", "npy", "--accept", "npy"]
    assert shell_capacity.serve_command("http-json", args)[-4:] == ["--body", "json", "--accept", "json"]
    assert shell_capacity.serve_command("http-base64", args)[-4:] == ["--body", "json", "--accept", "base64"]
    assert shell_capacity.serve_command("grpc", args)[-2:] == ["--transport", "grpc"]
    assert float(npy[npy.index("--duration") + 1]) == 2 and npy[npy.index("--concurrency") + 1] == "4"


def test_cores_per_gpu_is_the_gpus_rate_over_one_cores_faces():
    table = shell_capacity.capacity({"http-npy": _result(2500.0), "grpc": _result(None)}, [10000.0, 30000.0])
    assert table["http-npy"] == {"faces_per_cpu_s": 2500.0, "cores_per_gpu": {"10000": 4.0, "30000": 12.0}}
    assert table["grpc"]["cores_per_gpu"] == {"10000": None, "30000": None}  # nothing measured: no claim


def test_capacity_leaves_out_the_workers_start_up_a_long_job_pays_once():
    table = shell_capacity.capacity({"job": _result(2500.0, startup_cpu_s=3.0)}, [10000.0])
    assert table["job"] == {"faces_per_cpu_s": 2500.0, "cores_per_gpu": {"10000": 4.0}}


def test_the_readme_section_is_replaced_between_its_markers(tmp_path):
    results = {"http-npy": _result(2500.0), "job": _result(1000.0, startup_cpu_s=3.0)}
    settings = {"model": "synthetic:probe", "backend": "onnx", "concurrency": 16, "faces_per_request": 8,
                "duration": 10.0, "episodes": 8, "tracks": 8, "frames": 100}
    capacity = shell_capacity.capacity(results, [10000.0])
    report = {"gpu_fps": [10000.0], "results": results, "capacity": capacity,
              "cpu": "Some CPU", "cpus": 2, "date": "2026-12-02", "out": "out/shell-capacity",
              "command": "python scripts/shell_capacity.py", "settings": settings}
    text = shell_capacity.markdown(report)
    row = ("| HTTP, `.npy` body and answer | 500 | 0.400 (replica 0.50, proxy 0.30, ray_system 0.10) | "
           "0.0 | 2500 | 4.0 |")
    assert row in text
    # the start-up in its own column, not in the per-face figure nor in its largest roles
    assert ("| offline job (`embed-episodes`) | 500 | 1.000 (replica 0.50, proxy 0.30, ray_system 0.10) | "
            "3.0 | 1000 | 10.0 |") in text
    assert "Some CPU (2 cores)" in text and "`python scripts/shell_capacity.py`" in text
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\nbefore\n{shell_capacity.BEGIN}\nold\n{shell_capacity.END}\nafter\n")
    from engines.bench.render import replace_readme_section

    replace_readme_section(readme, shell_capacity.BEGIN, shell_capacity.END, text)
    written = readme.read_text()
    assert "old" not in written and written.startswith("# x\n\nbefore\n") and written.endswith("\nafter\n")
    assert written.count(shell_capacity.BEGIN) == 1 and text in written
    with pytest.raises(ValueError, match="no <!-- shell-capacity:begin -->"):
        replace_readme_section(_empty(tmp_path), shell_capacity.BEGIN, shell_capacity.END, text)


def _empty(tmp_path: Path) -> Path:
    path = tmp_path / "OTHER.md"
    path.write_text("# no markers\n")
    return path


@pytest.mark.parametrize("argv, message", [(["--paths", "http-npy,ftp"], "paths are"),
                                           (["--gpu-fps", "0"], "positive faces/s"),
                                           (["--gpu-fps", "fast"], "expected faces/s")])
def test_bad_arguments_exit_2_with_the_reason(argv, message, capsys):
    with pytest.raises(SystemExit) as info:
        shell_capacity.parse_args(argv)
    assert info.value.code == 2 and message in capsys.readouterr().err


def test_the_ratio_runs_take_the_model_from_the_environment():
    probe = {"PATH": "/bin", "ARCFACE_MODEL": "synthetic:probe", "ARCFACE_BACKEND": "onnx"}
    env = shell_capacity.model_env(probe, "synthetic:mobilefacenet", None)
    assert env == {"PATH": "/bin", "ARCFACE_MODEL": "synthetic:mobilefacenet"}  # the config's backend chain
    assert shell_capacity.model_env(env, "synthetic:probe", "onnx")["ARCFACE_BACKEND"] == "onnx"


def _ratio_result(parts: dict | None, refused: int = 0) -> dict:
    return {"faces": 1000, "faces_per_s": 120.0, "ratio_to_inprocess": 0.6, "ratio_parts": parts,
            "errors": {"503": refused} if refused else {},
            "engine": {"backend": "openvino", "precision": "bf16"}}


def test_the_ratio_section_splits_each_paths_ratio_in_its_factors():
    parts = {"engine_cpu_ms_per_face": 9.5, "inprocess_cores_busy": 1.8, "run_cpu_ms_per_face": 16.0,
             "run_cores_busy": 1.9, "other_cpu_ms_per_face": 6.5, "engine_share_of_cpu": 0.594,
             "cores_busy_ratio": 1.056}
    results = {"http-npy": _ratio_result(parts, refused=12), "grpc": _ratio_result(None),
               "job": _ratio_result({**parts, "steady_engine_share_of_cpu": 0.7})}
    settings = {"model": "synthetic:probe", "backend": "onnx", "concurrency": 16, "faces_per_request": 8,
                "duration": 10.0, "episodes": 8, "tracks": 8, "frames": 100}
    report = {"cpu": "Some CPU", "cpus": 2, "date": "2026-12-03", "settings": settings,
              "command": "python scripts/shell_capacity.py",
              "ratio": {"model": "synthetic:mobilefacenet", "backend": None, "concurrency": 8,
                        "results": results}}
    text = shell_capacity.ratio_markdown(report)
    # everything else may cost 9.5 x 0.05 / 0.95 = 0.5 ms per face for a ratio of 0.95
    assert ("| HTTP, `.npy` body and answer | 120 (12 requests refused) | 0.60 | 0.59 | 1.90 / 1.80 | 9.50 | "
            "6.50 | 0.50 |") in text
    assert "| offline job (`embed-episodes`) | 120 | 0.60 | 0.59 (0.70 without workers' start-up) |" in text
    not_seen = "| gRPC `EmbedBatch` (raw crops, packed answer) | 120 | - | - | - | - | - | - |"
    assert not_seen in text
    assert "`synthetic:mobilefacenet` on `openvino` bf16, each path as above, 8 clients x 8 faces" in text
    assert "Some CPU (2 cores)" in text
