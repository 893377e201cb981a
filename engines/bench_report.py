"""``arcface bench --report DIR``: every backend and precision, three models, four batch sizes.

One command produces everything the README shows about speed: ``report.json``
(every figure, the machine, the date, the command), ``report.md`` (the tables)
and ``report.png`` (throughput against batch size, one line per backend), and
with ``--readme`` it rewrites the README's marked section from them. Nothing
in it is typed by hand.

Method, for honest ratios on a shared, noisy machine: each backend/precision
runs in its own spawned worker (``bench._Runner``); per batch size, the
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
import os
import shlex
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .bench import SETTLE_S, BenchSpec, _Runner, machine_info
from .drift import compare_embeddings

logger = logging.getLogger(__name__)

REPORT_MODELS = ("mobilefacenet", "iresnet50", "iresnet100")
REPORT_BATCHES = (1, 8, 32, 64)
REFERENCE = ("insightface", "fp32")
README_BEGIN = "<!-- bench-report:begin -->"
README_END = "<!-- bench-report:end -->"


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


def candidates(device: str) -> list[tuple[str, str]]:
    """Every (backend, precision) this installation could run on ``device``, reference first."""
    from .openvino_backend import supported_precisions
    from .registry import backend_names, get_backend_class

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
    from .models import resolve_model

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
    for (backend, precision), runner in runners.items():
        peak, device_mb = runner.stop()
        for row in rows:
            if (row.backend, row.precision) == (backend, precision):
                row.peak_mem_mb = device_mb if device_mb is not None else peak
    facts = {"model": model, "sha256": resolved.sha256, "macs_per_face": macs,
             "auto": {"backend": auto_pick[0], "precision": auto_pick[1], "error": auto.error,
                      "fallback": auto.info.get("fallback")}}
    return rows, facts


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
) -> dict[str, Any]:
    """Measure, then write ``report.json``, ``report.md`` and ``report.png`` into ``out_dir``."""
    from tqdm import tqdm

    from .config import load_config
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
        "seconds": round(time.time() - started, 1),
        "models": model_facts,
        "rows": [asdict(r) for r in rows],
    }
    (out / "report.json").write_text(json.dumps(report, indent=2, default=_json_default) + "\n")
    (out / "report.md").write_text(render_markdown(report) + "\n")
    plot(report, out / "report.png")
    return report


def _json_default(value: Any) -> Any:
    if isinstance(value, float) and math.isnan(value):
        return None
    return str(value)


def _label(row: dict[str, Any]) -> str:
    return f"{row['backend']} {row['precision']}" + (" (auto)" if row["auto"] else "")


def _fmt(value: float | None, spec: str, empty: str = "-") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return empty
    return format(value, spec)


def _machine_line(report: dict[str, Any]) -> str:
    cpu = report["machine"]["cpu"]
    peaks = report["peaks"]
    extensions = ", ".join(
        [*cpu.get("amx", []), *[k for k in ("avx512_bf16", "avx512_vnni", "avx512_fp16") if cpu.get(k)]]
    ) or "no bf16/int8 extensions"
    return (
        f"{cpu['model']}, {cpu['logical_cpus']} logical CPUs ({extensions}); "
        f"measured matrix-product peak fp32 {_fmt(peaks.get('fp32_gflops'), '.0f')} GFLOP/s, "
        f"bf16 {_fmt(peaks.get('bf16_gflops'), '.0f', 'n/a')} GFLOP/s ({peaks['method']}); "
        f"{report['machine']['date']}"
    )


def _table(rows: list[dict[str, Any]], with_model: bool) -> list[str]:
    head = (["model"] if with_model else []) + [
        "backend", "precision", "batch", "faces/s", "p50 ms", "p99 ms", "speed-up vs insightface",
        "GFLOP/s", "of fp32 peak", "of bf16 peak", "min cos", "drift gate", "peak MB"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for r in rows:
        if r.get("error"):
            cells = ([r["model"]] if with_model else []) + [
                r["backend"], r["precision"], str(r["batch_size"]), f"error: {r['error']}"]
            lines.append("| " + " | ".join(cells) + " |" + " |" * (len(head) - len(cells)))
            continue
        cells = ([r["model"]] if with_model else []) + [
            r["backend"] + (" **(auto)**" if r["auto"] else ""), r["precision"], str(r["batch_size"]),
            _fmt(r["throughput_fps"], ".1f"), _fmt(r["latency_ms_p50"], ".1f"),
            _fmt(r["latency_ms_p99"], ".1f"), _fmt(r["speedup"], ".2f") + "x",
            _fmt(r["gflops"], ".0f"), _fmt(r["frac_fp32_peak"], ".0%"), _fmt(r["frac_bf16_peak"], ".0%"),
            _fmt(r["min_cosine_sim"], ".6f"), r["drift_gate"], _fmt(r["peak_mem_mb"], ".0f"),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def summary_markdown(report: dict[str, Any], batch: int = 32) -> str:
    """The README's part: machine, command, the rows at ``batch`` (or the largest measured)."""
    batches = sorted({r["batch_size"] for r in report["rows"]})
    batch = batch if batch in batches else batches[-1]
    rows = [r for r in report["rows"] if r["batch_size"] == batch]
    lines = [
        f"Machine: {_machine_line(report)}.",
        "",
        f"Command: `{report['command']}` ({report['seconds']:.0f} s). Batch {batch} below; every "
        "batch size in the full report.",
        "",
        *_table(rows, with_model=True),
    ]
    return "\n".join(lines)


def render_markdown(report: dict[str, Any]) -> str:
    lines = [
        "# Embedding backends side by side",
        "",
        f"Machine: {_machine_line(report)}.",
        "",
        f"Command: `{report['command']}`; {report['faces_per_point']} faces per point in "
        f"{report['rounds']} interleaved rounds; drift on {report['eval_faces']} eval faces against "
        f"insightface fp32, gate min cos >= {1 - report['max_drift_cosine']:.3f}; "
        f"{report['seconds']:.0f} s.",
        "",
        "Speed-ups are against the insightface reference of the same model and batch size, in the "
        "same rounds. GFLOP/s counts 2 x MACs per face; the fractions divide it by the "
        "matrix-product peak measured in the same run.",
    ]
    for facts in report["models"]:
        rows = [r for r in report["rows"] if r["model"] == facts["model"]]
        auto = facts["auto"]
        lines += [
            "",
            f"## {facts['model']} ({facts['macs_per_face'] / 1e9:.2f} GMAC per face)",
            "",
            f"`auto` picks **{auto['backend']} {auto['precision']}** on this machine.",
            "",
            *_table(rows, with_model=False),
        ]
    lines += ["", "![throughput against batch size](report.png)"]
    return "\n".join(lines)


def plot(report: dict[str, Any], path: str | Path) -> None:
    """Throughput against batch size, one line per backend/precision, one panel per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = [m["model"] for m in report["models"]]
    fig, axes = plt.subplots(1, len(models), figsize=(5.2 * len(models), 4.2), squeeze=False)
    for ax, model in zip(axes[0], models, strict=True):
        rows = [r for r in report["rows"] if r["model"] == model and not r.get("error")]
        for label in dict.fromkeys(_label(r) for r in rows):
            series = sorted((r["batch_size"], r["throughput_fps"]) for r in rows if _label(r) == label)
            ax.plot([b for b, _ in series], [f for _, f in series], marker="o", label=label,
                    linewidth=2.4 if "(auto)" in label else 1.4)
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted({r["batch_size"] for r in rows}))
        ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.set_xlabel("batch size (faces)")
        ax.set_ylabel("faces / s")
        ax.set_title(model)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{report['machine']['cpu']['model']} - {report['machine']['date']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def update_readme(readme: str | Path, report: dict[str, Any], report_dir: str | Path) -> None:
    """Replace the README section between the bench-report markers with this report."""
    readme = Path(readme)
    text = readme.read_text()
    if README_BEGIN not in text or README_END not in text:
        raise ValueError(f"{readme}: no {README_BEGIN} ... {README_END} section to update")
    rel = os.path.relpath(Path(report_dir), readme.parent)
    body = "\n".join([
        README_BEGIN,
        summary_markdown(report),
        "",
        f"![throughput against batch size]({rel}/report.png)",
        "",
        f"Full tables: [{rel}/report.md]({rel}/report.md); raw figures: `{rel}/report.json`.",
        README_END,
    ])
    head, rest = text.split(README_BEGIN, 1)
    _, tail = rest.split(README_END, 1)
    readme.write_text(head + body + tail)
