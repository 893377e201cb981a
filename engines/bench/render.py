"""The benchmark report as people read it: Markdown tables, the PNG plot, the README section.

Pure rendering of ``report.json``'s contents (``report.run_report`` measures);
nothing here is typed by hand, so the README cannot claim what was not measured.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

README_BEGIN = "<!-- bench-report:begin -->"
README_END = "<!-- bench-report:end -->"


def json_default(value: Any) -> Any:
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


def _model_notes(facts: dict[str, Any], with_model: bool) -> list[str]:
    """One line per int8 row: the recipe its graph carries (layers kept fp32, calibration, bound);
    with ``--accuracy`` one line of each engine's verification accuracy and its delta."""
    prefix = f"{facts['model']} " if with_model else ""
    lines = [f"- int8 recipe, {prefix}{label}: {item['summary']}"
             for label, item in facts.get("int8", {}).items()]
    acc = facts.get("accuracy")
    if acc:
        cells = []
        for spec, figures in acc["engines"].items():
            delta = figures.get("delta_vs_reference", {}).get("accuracy")
            shown = f"{figures['accuracy_kfold']:.4f}"
            if delta:
                shown += f" ({delta['delta']:+.4f}, 95% CI {delta['ci_low']:+.4f} .. {delta['ci_high']:+.4f})"
            cells.append(f"{spec} {shown}")
        lines.append(f"- verification accuracy, {prefix}{acc['faces']} jittered faces of {acc['identities']} "
                     f"identities, {acc['pairs']} pairs (delta vs the reference): " + "; ".join(cells)
                     + (f". {acc['note']}" if acc.get("note") else ""))
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
    recipes = [line for facts in report["models"] for line in _model_notes(facts, with_model=True)]
    if recipes:
        lines += ["", *recipes]
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
        recipes = _model_notes(facts, with_model=False)
        if recipes:
            lines += ["", *recipes]
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


def replace_readme_section(readme: str | Path, begin: str, end: str, body: str) -> None:
    """Replace what lies between the ``begin`` and ``end`` marker lines of ``readme`` with
    ``body`` (the markers stay): how measured tables get into the README, never by hand."""
    readme = Path(readme)
    text = readme.read_text()
    if begin not in text or end not in text:
        raise ValueError(f"{readme}: no {begin} ... {end} section to update")
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    readme.write_text(head + begin + "\n" + body.strip("\n") + "\n" + end + tail)


def update_readme(readme: str | Path, report: dict[str, Any], report_dir: str | Path) -> None:
    """Replace the README section between the bench-report markers with this report."""
    rel = os.path.relpath(Path(report_dir), Path(readme).parent)
    body = "\n".join([
        summary_markdown(report),
        "",
        f"![throughput against batch size]({rel}/report.png)",
        "",
        f"Full tables: [{rel}/report.md]({rel}/report.md); raw figures: `{rel}/report.json`.",
    ])
    replace_readme_section(readme, README_BEGIN, README_END, body)
