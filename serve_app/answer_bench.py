"""``arcface bench-answers``: what writing the answer of ``/v1/embed`` costs the replica, per
encoding, side by side in one run (``serve_app.answers``).

The answer is written on the replica's event loop, so its cost delays every request queued
behind it. Measured here on unit-norm float32 embeddings: the stdlib path the service used
before (``tolist()`` + ``json.dumps``) as the baseline, then what it writes now: orjson lists
of numbers (``encoding=json``), base64 float32 (``encoding=base64``) and ``.npy``
(``Accept: application/x-npy``); and, for the client, what reading each back costs.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from engines import Command, cpu_model_name, emit_json, positive_int, positive_ints, replace_readme_section

from .answers import embed_answer

_FIELDS = {"dim": 512, "model": "bench", "backend": "none", "precision": "fp32", "contract": "bench",
           "synthetic": True}


def _per_call_ms(fn: Callable[[], Any], min_s: float) -> float:
    fn()
    calls, started = 0, time.perf_counter()
    while True:
        fn()
        calls += 1
        elapsed = time.perf_counter() - started
        if elapsed >= min_s and calls >= 3:
            return elapsed / calls * 1e3


def _stdlib(emb: np.ndarray, norms: np.ndarray) -> bytes:
    return json.dumps({"embeddings": emb.tolist(), "norms": norms.tolist(), "encoding": "json",
                       **_FIELDS}).encode()


def measure(faces: int, dim: int = 512, min_s: float = 0.3) -> dict[str, Any]:
    """ms per answer of ``faces`` embeddings, written and read, for each encoding."""
    from .client import _Protocol

    rng = np.random.default_rng(faces)
    emb = rng.standard_normal((faces, dim)).astype(np.float32)
    norms = np.linalg.norm(emb, axis=1).astype(np.float32)
    emb /= norms[:, None]
    fields = {**_FIELDS, "dim": dim}
    writers: dict[str, Callable[[], Any]] = {
        "stdlib_json": lambda: _stdlib(emb, norms),
        "json": lambda: embed_answer(emb, norms, fields, {}, "", "json"),
        "base64": lambda: embed_answer(emb, norms, fields, {}, "", "base64"),
        "npy": lambda: embed_answer(emb, norms, fields, {}, "application/x-npy", "json"),
    }
    reader = _Protocol("http://bench")
    out: dict[str, Any] = {}
    for name, write in writers.items():
        answer = write()
        body = answer if isinstance(answer, bytes) else answer.body
        headers = {"content-type": "application/json"} if isinstance(answer, bytes) else {
            k.decode(): v.decode() for k, v in answer.raw_headers}
        read_back = reader._result(headers, body, len(emb))
        if not np.array_equal(read_back.embeddings, emb):
            raise AssertionError(f"{name}: the answer does not read back to the same float32")
        out[name] = {"write_ms": _per_call_ms(write, min_s),
                     "read_ms": _per_call_ms(lambda h=headers, b=body: reader._result(h, b, len(emb)), min_s),
                     "bytes": len(body)}
    base = out["stdlib_json"]
    for entry in out.values():
        entry["write_vs_stdlib"] = entry["write_ms"] / base["write_ms"]
        entry["bytes_vs_stdlib"] = entry["bytes"] / base["bytes"]
    return out


BEGIN, END = "<!-- bench-answers:begin -->", "<!-- bench-answers:end -->"
_NAMES = {"stdlib_json": "stdlib JSON (before)", "json": "`encoding=json` (orjson)",
          "base64": "`encoding=base64`", "npy": "`.npy`"}


def markdown(result: dict[str, Any]) -> str:
    """The README table: write ms (x the stdlib path) and size per encoding, then read ms."""
    names = list(_NAMES)
    rows = ["| faces | " + " | ".join(_NAMES[n] for n in names) + " |", "|---|" + "---|" * len(names)]
    for n, enc in result["faces"].items():
        cells = [f"{enc[k]['write_ms']:.3f} ms ({enc[k]['write_vs_stdlib']:.3f}x), "
                 f"{enc[k]['bytes'] / 1e3:.1f} KB" for k in names]
        rows.append(f"| {n} | " + " | ".join(cells) + " |")
    rows += ["", "Reading back (the client), ms: " + "; ".join(
        f"{n} faces: " + ", ".join(f"{k} {enc[k]['read_ms']:.3f}" for k in names)
        for n, enc in result["faces"].items()) + ".",
        "", f"Measured {result['date']} on {result['cpu']} with `arcface bench-answers "
        f"--faces {','.join(result['faces'])} --readme README.md` ({result['dim']}-d float32)."]
    return "\n".join(rows)


def run(args: argparse.Namespace) -> int:
    import datetime

    result = {"cpu": cpu_model_name(), "dim": args.dim, "date": datetime.date.today().isoformat(),
              "faces": {str(n): measure(n, args.dim, args.min_seconds) for n in args.faces}}
    if args.readme:
        replace_readme_section(args.readme, BEGIN, END, markdown(result))
    if args.json:
        emit_json(result)
        return 0
    print(f"answer of /v1/embed, {args.dim}-d float32, on {result['cpu']} (ms per answer)")
    print(f"{'faces':>6} {'encoding':<12} {'write ms':>9} {'read ms':>8} {'bytes':>9} {'write/stdlib':>13}")
    for n, encodings in result["faces"].items():
        for name, e in encodings.items():
            print(f"{n:>6} {name:<12} {e['write_ms']:9.3f} {e['read_ms']:8.3f} {e['bytes']:9d} "
                  f"{e['write_vs_stdlib']:13.3f}")
    return 0


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--faces", type=positive_ints, default=[1, 8, 256],
                   help="faces per answer (default 1,8,256)")
    p.add_argument("--dim", type=positive_int, default=512)
    p.add_argument("--min-seconds", type=float, default=0.3, help="time each measurement at least this long")
    p.add_argument("--readme", help="write the table into this README's bench-answers section")
    p.add_argument("--json", action="store_true")


COMMAND = Command("bench-answers", "cost of writing /v1/embed answers per encoding (stdlib json, orjson, "
                  "base64, npy)", add_arguments, run, order=72)
