"""``arcface bench --report DIR``: every backend and precision, three models, four batch sizes.

One command produces everything the README shows about speed: ``report.json``
(every figure, the machine, the date, the command), ``report.md`` (the tables)
and ``report.png`` (throughput against batch size, one line per backend), and
with ``--readme`` it rewrites the README's marked section from them. Nothing
in it is typed by hand.

Method, for honest ratios on a shared, noisy machine: each backend/precision
runs in its own spawned worker (``workers._Runner``); per batch size, the
workers run in interleaved rounds (A, B, C, A, B, C, ...) so a slow minute
hurts them alike; speed-ups are against the insightface reference of the
same model and batch size measured in those same rounds. Drift is measured
once per model on the eval faces against the same reference, and shown next
to the speed: a fast path the drift gate would refuse is listed, marked, and
never what ``auto`` picks.
"""

from __future__ import annotations

import json
import logging
import math
import multiprocessing as mp
import shlex
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..drift import compare_embeddings
from .render import json_default, plot, render_markdown
from .workers import SETTLE_S, BenchSpec, _Runner, machine_info

logger = logging.getLogger(__name__)

REPORT_MODELS = ("mobilefacenet", "iresnet50", "iresnet100")
REPORT_BATCHES = (1, 8, 32, 64)
REFERENCE = ("insightface", "fp32")


@dataclass
class ReportRow:
    model: str
    backend: str
    precision: str
    batch_size: int
    throughput_fps: float
    latency_ms_p50: float
    latency_ms_p99: float
    peak_mem_mb: float
    speedup: float  # over the insightface reference, same model, batch and rounds
    gflops: float  # 2 x MACs per face x faces/s
    frac_fp32_peak: float | None
    frac_bf16_peak: float | None
    min_cosine_sim: float | None  # against the reference on the eval faces
    mean_cosine_sim: float | None
    drift_gate: str  # pass | refuse | reference
    auto: bool  # the backend and precision ``auto`` picks on this machine
    error: str | None = None
    recipe: str | None = None  # int8 rows: the graph's recipe (``precision.recipe_summary``)
    # with --accuracy: 10-fold verification accuracy on the jittered test identities, and its
    # paired-bootstrap delta against the reference's (``bench.accuracy``)
    accuracy: float | None = None
    accuracy_delta: float | None = None


def candidates(device: str) -> list[tuple[str, str]]:
    """Every (backend, precision) this installation could run on ``device``, reference first."""
    from ..backends.openvino import supported_precisions
    from ..backends.registry import backend_names, get_backend_class

    if device.startswith("cuda"):
        wanted = [REFERENCE, ("onnx", "fp32"), ("onnx", "fp16"),
                  ("tensorrt", "fp32"), ("tensorrt", "fp16"), ("tensorrt", "int8")]
    else:
        native = supported_precisions()
        wanted = [REFERENCE, ("onnx", "fp32"), ("onnx", "int8"), ("openvino", "fp32")]
        wanted += [("openvino", p) for p in ("bf16", "fp16", "int8") if native[p] is None]
    names = backend_names()
    return [(b, p) for b, p in wanted if b in names and get_backend_class(b).availability() is None]


def _summarise(latencies: list[float], batch: int) -> tuple[float, float, float]:
    lat = np.asarray(latencies, dtype=np.float64)
    if lat.size == 0:
        return 0.0, math.nan, math.nan
    return (float(lat.size * batch / lat.sum()), float(np.percentile(lat, 50) * 1e3),
            float(np.percentile(lat, 99) * 1e3))


def _model_rows(
    model: str,
    device: str,
    batches: tuple[int, ...],
    faces_per_point: int,
    rounds: int,
    peaks: dict[str, Any],
    eval_size: int,
    max_drift: float,
    config_path: str | None,
    bar: Any,
    timeout_s: float,
) -> tuple[list[ReportRow], dict[str, Any]]:
    from ..models.resolve import resolve_model

    resolved = resolve_model(f"synthetic:{model}")
    macs = resolved.macs_per_face or 0
    largest = max(batches)
    ctx = mp.get_context("spawn")
    start_lock = ctx.Lock()

    def spec(backend: str, precision: str | None, gate: bool) -> BenchSpec:
        return BenchSpec(backend, f"synthetic:{model}", largest, precision, device, config_path,
                         max_batch_size=largest, drift_gate=gate)

    # auto first, with the drift gate on exactly as it serves; then every candidate it
    # did not already cover, gate off so a refused path is still measured
    auto = _Runner(spec("auto", None, True), ctx, start_lock)
    auto.wait_ready(timeout_s)
    auto_pick = (auto.info.get("backend"), auto.info.get("precision"))
    runners: dict[tuple[str, str], _Runner] = {}
    for backend, precision in candidates(device):
        if (backend, precision) == auto_pick:
            runners[(backend, precision)] = auto
        else:
            runners[(backend, precision)] = _Runner(spec(backend, precision, False), ctx, start_lock)
    for runner in runners.values():
        if runner is not auto:
            runner.wait_ready(timeout_s)
    if auto_pick not in runners:
        auto.stop()
    bar.update(1)

    reference = runners.get(REFERENCE)
    ref_vectors = reference.embed_eval(eval_size, timeout_s) if reference else None
    drift: dict[tuple[str, str], Any] = {}
    for key, runner in runners.items():
        vectors = runner.embed_eval(eval_size, timeout_s)
        if key == REFERENCE or vectors is None or ref_vectors is None:
            continue
        drift[key] = compare_embeddings(ref_vectors, vectors).gate(max_drift)

    rows: list[ReportRow] = []
    for batch in batches:
        per_round = max(1, math.ceil(faces_per_point / batch / rounds))
        for runner in runners.values():
            runner.run(1, timeout_s, batch)  # warm-up at this shape
        latencies: dict[tuple[str, str], list[float]] = {key: [] for key in runners}
        for _ in range(rounds):
            for key, runner in runners.items():
                # let the previous worker's runtime threads stop spinning before timing the next
                time.sleep(SETTLE_S)
                latencies[key] += runner.run(per_round, timeout_s, batch)
                bar.update(1)
        ref_fps = _summarise(latencies.get(REFERENCE, []), batch)[0]
        for (backend, precision), runner in runners.items():
            fps, p50, p99 = _summarise(latencies[(backend, precision)], batch)
            gflops = 2.0 * macs * fps / 1e9
            report = drift.get((backend, precision))
            rows.append(ReportRow(
                model=model, backend=backend, precision=precision, batch_size=batch,
                throughput_fps=fps, latency_ms_p50=p50, latency_ms_p99=p99, peak_mem_mb=math.nan,
                speedup=fps / ref_fps if ref_fps > 0 else 0.0, gflops=gflops,
                frac_fp32_peak=gflops / peaks["fp32_gflops"] if peaks.get("fp32_gflops") else None,
                frac_bf16_peak=gflops / peaks["bf16_gflops"] if peaks.get("bf16_gflops") else None,
                min_cosine_sim=report.min_cosine_sim if report else (1.0 if runner is reference else None),
                mean_cosine_sim=report.mean_cosine_sim if report else (1.0 if runner is reference else None),
                drift_gate="reference" if runner is reference else ("pass" if report and report.passed
                                                                   else "refuse"),
                auto=(backend, precision) == auto_pick,
                error=runner.error,
            ))
    recipes = _int8_recipes(runners)
    for row in rows:
        row.recipe = recipes.get((row.backend, row.precision), {}).get("summary")
    for (backend, precision), runner in runners.items():
        peak, device_mb = runner.stop()
        for row in rows:
            if (row.backend, row.precision) == (backend, precision):
                row.peak_mem_mb = device_mb if device_mb is not None else peak
    facts = {"model": model, "sha256": resolved.sha256, "macs_per_face": macs,
             "auto": {"backend": auto_pick[0], "precision": auto_pick[1], "error": auto.error,
                      "fallback": auto.info.get("fallback")},
             "int8": {f"{backend} {precision}": facts for (backend, precision), facts in recipes.items()}}
    return rows, facts


def _int8_recipes(runners: dict[tuple[str, str], Any]) -> dict[tuple[str, str], dict[str, Any]]:
    """What each int8 row ran: the recipe and search summary its graph carries in its metadata."""
    from ..models.precision import int8_facts

    out = {}
    for key, runner in runners.items():
        path = runner.info.get("model_path")
        if key[1] == "int8" and path and not runner.error:
            facts = int8_facts(path)
            if facts is not None:
                out[key] = facts
    return out


def _add_accuracy(model: str, rows: list[ReportRow], facts: dict[str, Any], cfg: Any) -> None:
    """``arcface evaluate``'s figures for every engine that ran, reference first, into the rows."""
    from .accuracy import accuracy_report

    engines = list(dict.fromkeys((r.backend, r.precision) for r in rows if not r.error))
    engines.sort(key=lambda key: key != REFERENCE)
    if not engines or engines[0] != REFERENCE:
        return
    report = accuracy_report(f"synthetic:{model}", engines, cfg)
    facts["accuracy"] = report
    for row in rows:
        figures = report["engines"].get(f"{row.backend}:{row.precision}")
        if figures:
            row.accuracy = figures["accuracy_kfold"]
            delta = figures.get("delta_vs_reference", {}).get("accuracy")
            row.accuracy_delta = delta["delta"] if delta else 0.0


def run_report(
    out_dir: str | Path,
    models: tuple[str, ...] = REPORT_MODELS,
    batches: tuple[int, ...] = REPORT_BATCHES,
    faces_per_point: int = 128,
    rounds: int = 3,
    device: str = "cpu",
    config_path: str | None = None,
    eval_size: int = 32,
    progress: bool = True,
    timeout_s: float = 1800.0,
    command: str | None = None,
    accuracy: bool = False,
) -> dict[str, Any]:
    """Measure, then write ``report.json``, ``report.md`` and ``report.png`` into ``out_dir``.
    ``accuracy``: also each engine's verification accuracy and its delta against the reference
    (``bench.accuracy``; in this process, after the speed rounds)."""
    from tqdm import tqdm

    from ..config.loader import load_config
    from .peak import measure_peaks

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = load_config(config_path) if config_path else load_config()
    started = time.time()
    n_candidates = len(candidates(device))
    total = len(models) * (1 + len(batches) * rounds * n_candidates) + 1
    with tqdm(total=total, desc="bench report", unit="step", disable=not progress) as bar:
        bar.set_postfix_str("matrix-product peak")
        peaks = measure_peaks(device)
        bar.update(1)
        rows: list[ReportRow] = []
        model_facts = []
        for model in models:
            bar.set_postfix_str(model)
            model_rows, facts = _model_rows(
                model, device, tuple(batches), faces_per_point, rounds, peaks, eval_size,
                cfg.validation.max_drift_cosine, config_path, bar, timeout_s,
            )
            if accuracy:
                bar.set_postfix_str(f"{model} accuracy")
                _add_accuracy(model, model_rows, facts, cfg)
            rows += model_rows
            model_facts.append(facts)
    report = {
        "command": command or "arcface " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
        "machine": machine_info(),
        "device": device,
        "peaks": peaks,
        "max_drift_cosine": cfg.validation.max_drift_cosine,
        "eval_faces": eval_size,
        "faces_per_point": faces_per_point,
        "rounds": rounds,
        "accuracy": accuracy,
        "seconds": round(time.time() - started, 1),
        "models": model_facts,
        "rows": [asdict(r) for r in rows],
    }
    (out / "report.json").write_text(json.dumps(report, indent=2, default=json_default) + "\n")
    (out / "report.md").write_text(render_markdown(report) + "\n")
    plot(report, out / "report.png")
    return report
