"""``scripts/grpc_answer_bench.py``: every answer encoding decodes to the matrix it was built from,
and the report has each side's cost (no speed asserted: that is the benchmark's job)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

SCRIPT = Path(__file__).parents[2] / "scripts" / "grpc_answer_bench.py"


def test_grpc_answer_bench_reports_each_encoding(capsys):
    spec = importlib.util.spec_from_file_location("grpc_answer_bench", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main(["--faces", "3", "--dim", "8", "--repeat", "1", "--number", "1"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert (out["faces"], out["dim"]) == (3, 8) and out["cpu"]
    assert set(out["encodings"]) == {"packed", "repeated", "repeated_numpy_rows"}
    for cost in out["encodings"].values():
        assert cost["replica_ms"] > 0 and cost["client_ms"] > 0 and cost["bytes"] > 3 * 8 * 4
