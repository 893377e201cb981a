"""``arcface bench --report``: one command, every available backend and precision, files that
the README is generated from. Run for real (spawned workers, real runtimes), quick sizes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from engines.bench.peak import measure_peaks
from engines.bench.render import README_BEGIN, README_END
from engines.bench.report import candidates

pytestmark = pytest.mark.integration


def run_cli(*args: str, check: bool = False,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "engines", *args], capture_output=True, text=True,
                          timeout=600, env={**os.environ, **(env or {})})
    if check and proc.returncode != 0:
        raise AssertionError(f"arcface {args} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


def test_peaks_are_measured_for_the_native_precisions():
    peaks = measure_peaks(seconds=0.1)
    assert peaks["fp32_gflops"] > 1.0
    assert "method" in peaks


def test_quick_report_writes_json_markdown_png_and_the_readme_section(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"# Project\n\nintro\n\n{README_BEGIN}\nold table\n{README_END}\n\nafter\n")
    out = tmp_path / "bench"
    # full int8 (no layer search: minutes per model on 2 cores, tested in test_int8.py); its rows
    # still carry the recipe their graph records
    proc = run_cli("--log-level", "WARNING", "bench", "--report", str(out), "--quick", "--accuracy",
                   "--readme", str(readme), check=True, env={"ARCFACE_QUANTIZATION__KEEP_FP32": "none"})
    assert "wrote" in proc.stdout

    report = json.loads((out / "report.json").read_text())
    pairs = candidates("cpu")
    assert pairs[0] == ("insightface", "fp32")
    rows = report["rows"]
    # every candidate at every batch size, none failed
    assert {(r["backend"], r["precision"], r["batch_size"]) for r in rows} == {
        (b, p, n) for b, p in pairs for n in (1, 8)}
    assert not [r for r in rows if r["error"]]
    macs = report["models"][0]["macs_per_face"]
    for r in rows:
        assert r["throughput_fps"] > 0 and r["latency_ms_p50"] > 0 and r["peak_mem_mb"] > 10
        assert r["gflops"] == pytest.approx(2 * macs * r["throughput_fps"] / 1e9)
        assert r["frac_fp32_peak"] == pytest.approx(r["gflops"] / report["peaks"]["fp32_gflops"])
        if (r["backend"], r["precision"]) == ("insightface", "fp32"):
            assert r["speedup"] == pytest.approx(1.0) and r["drift_gate"] == "reference"
        else:
            assert r["min_cosine_sim"] is not None
            assert r["drift_gate"] == ("pass" if r["min_cosine_sim"] >= 0.999 else "refuse")
    # int8 rows carry the recipe their graph records; every row its accuracy and delta vs the reference
    for r in rows:
        assert (r["recipe"] is not None) == (r["precision"] == "int8"), r
        assert 0.0 <= r["accuracy"] <= 1.0 and -1.0 <= r["accuracy_delta"] <= 1.0
        if (r["backend"], r["precision"]) == ("insightface", "fp32"):
            assert r["accuracy_delta"] == 0.0
    facts = report["models"][0]
    assert facts["accuracy"]["identities"] == 7 and set(facts["int8"]) == {
        f"{b} {p}" for b, p in pairs if p == "int8"}
    # exactly one backend/precision is what auto serves, and the gate accepted it
    auto_rows = {(r["backend"], r["precision"]) for r in rows if r["auto"]}
    assert len(auto_rows) == 1
    assert all(r["drift_gate"] != "refuse" for r in rows if r["auto"])
    assert report["machine"]["cpu"]["logical_cpus"] >= 1 and report["command"].startswith("arcface")

    md = (out / "report.md").read_text()
    assert "## mobilefacenet" in md and "speed-up vs insightface" in md and "(auto)" in md
    assert ("int8 recipe" in md) == any(p == "int8" for _, p in pairs) and "verification accuracy" in md
    assert (out / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    text = readme.read_text()
    assert "old table" not in text and text.startswith("# Project") and text.rstrip().endswith("after")
    assert "| mobilefacenet | insightface | fp32 | 8 |" in text
    assert "](bench/report.png)" in text


@pytest.mark.parametrize(
    "args, message",
    [
        (("--models", "resnet9"), "choose from"),
        (("--batch-sizes", "8,0"), "positive integers"),
        (("--readme", "/nonexistent/README.md"), "no such file"),
    ],
)
def test_report_rejects_bad_input(tmp_path, args, message):
    proc = run_cli("bench", "--report", str(tmp_path / "r"), *args)
    assert proc.returncode == 2 and message in proc.stderr
