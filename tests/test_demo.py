"""The README's main job (`make demo` runs `arcface demo`), end to end: every step, every check."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.integration


def test_demo_runs_every_step_and_every_check_passes(tmp_path):
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    proc = subprocess.run(
        [sys.executable, "-m", "engines", "demo", "--workdir", str(tmp_path)],
        capture_output=True, text=True, timeout=600, env=env,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "all checks passed" in proc.stdout
    summary = json.loads((tmp_path / "demo.json").read_text())
    assert summary["drift"]["passed"] and summary["drift"]["min_cosine_sim"] >= 0.99999
    assert {"serve", "offline"} <= set(summary), sorted(summary)
