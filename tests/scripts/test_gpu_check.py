"""``scripts/gpu_check.py`` (``make gpu-check``) on a CPU host: its argument parsing, skip logic,
verdict, report writing and pytest-result reading; and the whole run, which here has nothing to
check and must say so in its report (the GPU steps themselves run on GPU hosts)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "gpu_check.py"
_spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
gpu_check = importlib.util.module_from_spec(_spec)
sys.modules["gpu_check"] = gpu_check  # dataclasses look their module up there
_spec.loader.exec_module(gpu_check)

ALL = {"cuda_device": True, "cuda_python": True, "tensorrt": True, "onnxruntime_gpu": True}
NO_TRT = {**ALL, "tensorrt": False}
CPU = dict.fromkeys(ALL, False)


def result(name, status, reason=None):
    return gpu_check.StepResult(name, status, reason=reason)


def test_arguments_default_to_every_step_in_order_and_reject_unknown_ones(capsys):
    args = gpu_check.parse_args([])
    assert args.steps == list(gpu_check.STEP_NAMES) and args.budget_s == 600 and args.batch_size == 32
    assert gpu_check.parse_args(["--steps", "bench,facts"]).steps == ["facts", "bench"]
    bad_arguments = (["--steps", "facts,warp_drive"], ["--budget-s", "0"], ["--batch-size", "-3"],
                     ["--steps", ""])
    for bad in bad_arguments:
        with pytest.raises(SystemExit) as info:
            gpu_check.parse_args(bad)
        assert info.value.code == 2
    assert "warp_drive" in capsys.readouterr().err


def test_each_step_says_what_it_needs_that_the_host_lacks():
    steps = {s.name: s for s in gpu_check.STEPS}
    assert gpu_check.skip_reason(steps["facts"], CPU, 600) is None
    assert gpu_check.skip_reason(steps["bench"], CPU, 600) == (
        "no CUDA device is visible; the onnxruntime in charge is the CPU build")
    assert gpu_check.skip_reason(steps["onnx_parse"], NO_TRT, 600) == "TensorRT is not installed"
    assert gpu_check.skip_reason(steps["cuda_ep"], NO_TRT, 600) is None
    assert "out of time" in gpu_check.skip_reason(steps["tensorrt_backend"], ALL, 10)


def test_the_steps_fit_the_ten_minute_budget_they_promise():
    assert sum(s.min_s for s in gpu_check.STEPS) < 600
    assert all(s.min_s <= s.timeout_s for s in gpu_check.STEPS)


def test_the_verdict():
    passed = [result(n, "passed") for n in gpu_check.STEP_NAMES]
    assert gpu_check.verdict(passed, ALL) == "pass"
    without = [result(s.name, "skipped", "TensorRT is not installed") if "tensorrt" in s.needs
               else result(s.name, "passed") for s in gpu_check.STEPS]
    assert gpu_check.verdict(without, NO_TRT) == "pass_without_tensorrt"
    assert gpu_check.verdict([*passed[:-1], result("bench", "failed", "tensorrt: boom")], ALL) == "fail"
    timed_out = [*passed[:-1], result("bench", "skipped", "out of time: 3 s of the budget left")]
    assert gpu_check.verdict(timed_out, ALL) == "fail"  # a check that did not run is not a pass
    assert gpu_check.verdict([result("facts", "passed")], CPU) == "nothing_to_check"
    assert {gpu_check.EXIT_CODES[v] for v in ("pass", "pass_without_tensorrt")} == {0}


def test_the_report_is_written_whole(tmp_path):
    path = gpu_check.write_report(tmp_path / "out", {"verdict": "pass", "steps": []})
    assert json.loads(path.read_text()) == {"verdict": "pass", "steps": []}
    assert [p.name for p in path.parent.iterdir()] == ["report.json"]  # no temp file left


def test_pytest_results_are_read_from_a_real_junit_report(tmp_path):
    tests = tmp_path / "test_sample.py"
    tests.write_text(textwrap.dedent("""
        import pytest
        def test_ok(): pass
        def test_broken(): assert 1 == 2, "one is not two"
        def test_absent(): pytest.skip("needs two CUDA devices")
    """))
    junit = tmp_path / "junit.xml"
    subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={junit}",
                    str(tests)], capture_output=True, cwd=tmp_path, timeout=120)
    counts = gpu_check.junit_counts(junit)
    assert (counts["passed"], counts["failed"], counts["skipped"]) == (1, 1, 1)
    assert "test_broken" in counts["failures"][0] and "needs two CUDA devices" in counts["skips"][0]
    assert gpu_check.pytest_status(counts) == ("failed", "1 test(s) failed")
    only_skips = {**counts, "passed": 0, "failed": 0}
    assert gpu_check.pytest_status(only_skips)[0] == "skipped"


@pytest.mark.slow
def test_on_this_cpu_host_the_check_runs_the_facts_and_says_what_it_skipped(tmp_path):
    proc = subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path)], capture_output=True,
                          text=True, timeout=300, cwd=ROOT)
    report = json.loads((tmp_path / "report.json").read_text())
    if report["capabilities"]["cuda_device"]:
        pytest.skip("a GPU host: the real check ran, its verdict is that host's")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert report["verdict"] == "nothing_to_check" and report["report_format"] == 1
    steps = {s["name"]: s for s in report["steps"]}
    assert list(steps) == list(gpu_check.STEP_NAMES)
    assert steps["facts"]["status"] == "passed"
    assert steps["facts"]["details"]["stack"]["onnxruntime_version"]
    for name in gpu_check.STEP_NAMES[1:]:
        assert steps[name]["status"] == "skipped" and "no CUDA device is visible" in steps[name]["reason"]
        assert report["skipped"][name] == steps[name]["reason"]
    assert "verdict nothing_to_check" in proc.stdout
