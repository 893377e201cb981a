"""``arcface bench``: backends side by side (``--report``: every backend, precision, model, batch)."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..config.schema import PRECISIONS
from .common import (
    EXIT_FAILED,
    EXIT_OK,
    Command,
    add_common,
    backend_list,
    emit_json,
    load_cfg,
    positive_int,
    positive_ints,
)


def run(args: argparse.Namespace) -> int:
    if args.report:
        return _bench_report(args)
    from ..bench.workers import format_table, machine_info, run_benchmark

    cfg = load_cfg(args)
    model = args.model or cfg.embedding.model
    results = run_benchmark(
        args.backends,
        model,
        batch_size=args.batch_size,
        num_faces=args.num_faces,
        warmup_batches=args.warmup,
        rounds=args.rounds,
        precision=args.precision,
        device=args.device,
        config_path=args.config,
        progress=not args.json,
        preprocess=args.preprocess,
    )
    failed = any(r.error for r in results)
    if args.json:
        emit_json({"results": [r.to_dict() for r in results], "machine": machine_info()})
    else:
        print(format_table(results))
    return EXIT_FAILED if failed else EXIT_OK


def _bench_report(args: argparse.Namespace) -> int:
    from ..bench.render import summary_markdown, update_readme
    from ..bench.report import REPORT_BATCHES, REPORT_MODELS, run_report
    from ..hardware import resolve_device

    if args.readme and not Path(args.readme).is_file():
        raise ValueError(f"--readme {args.readme}: no such file")
    models = tuple(args.models or (("mobilefacenet",) if args.quick else REPORT_MODELS))
    batches = tuple(args.batch_sizes or ((1, 8) if args.quick else REPORT_BATCHES))
    faces = args.faces_per_point or (16 if args.quick else 128)
    report = run_report(
        args.report,
        models=models,
        batches=batches,
        faces_per_point=faces,
        rounds=2 if args.quick else args.rounds,
        device=resolve_device(args.device or "cpu"),
        config_path=args.config,
        eval_size=16 if args.quick else 32,
        progress=not args.json,
        accuracy=args.accuracy,
    )
    if args.readme:
        update_readme(args.readme, report, args.report)
    if args.json:
        emit_json(report)
    else:
        print(summary_markdown(report))
        print(f"\nwrote {args.report}/report.json, report.md, report.png")
    reference_failed = any(r["error"] for r in report["rows"] if r["backend"] == "insightface")
    return EXIT_FAILED if reference_failed else EXIT_OK


def _preprocess_modes(text: str) -> list[str]:
    modes = [m.strip() for m in text.split(",") if m.strip()]
    if not modes or any(m not in ("auto", "graph", "host") for m in modes):
        raise argparse.ArgumentTypeError(f"comma-separated auto, graph, host; got {text!r}")
    return modes


def _model_names(text: str) -> list[str]:
    from ..models.synthetic import ARCHITECTURES

    names = [n.strip().removeprefix("synthetic:") for n in text.split(",") if n.strip()]
    bad = [n for n in names if n not in ARCHITECTURES]
    if not names or bad:
        raise argparse.ArgumentTypeError(f"choose from {sorted(ARCHITECTURES)}, got {text!r}")
    return names


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backends", type=backend_list, default=["insightface", "onnx"],
                   help="comma-separated; the first is the speed-up baseline")
    p.add_argument("--batch-size", type=positive_int, default=32)
    p.add_argument("--num-faces", type=positive_int, default=256)
    p.add_argument("--warmup", type=int, default=2, help="warm-up batches per backend")
    p.add_argument("--rounds", type=positive_int, default=4,
                   help="interleaved rounds (A,B,A,B...) to spread machine noise")
    p.add_argument("--precision", choices=PRECISIONS)
    p.add_argument("--preprocess", type=_preprocess_modes, metavar="MODES",
                   help="comma-separated host,graph: run every backend once per preprocessing mode "
                        "(default: embedding.preprocess)")
    p.add_argument("--device")
    p.add_argument("--json", action="store_true")
    r = p.add_argument_group("report (every backend and precision, several models and batch sizes)")
    r.add_argument("--report", metavar="DIR",
                   help="write DIR/report.json, report.md, report.png (ignores --backends)")
    r.add_argument("--quick", action="store_true",
                   help="report on mobilefacenet at batches 1,8 only (a smoke run)")
    r.add_argument("--models", type=_model_names,
                   help="comma-separated synthetic architectures (default: all three)")
    r.add_argument("--batch-sizes", type=positive_ints, help="default: 1,8,32,64")
    r.add_argument("--faces-per-point", type=positive_int,
                   help="faces measured per backend and batch size (default 128)")
    r.add_argument("--accuracy", action="store_true",
                   help="also each engine's verification accuracy on jittered test identities and its "
                        "delta against insightface (arcface evaluate's metrics)")
    r.add_argument("--readme", metavar="PATH",
                   help="also rewrite PATH's bench-report section from the report")
    add_common(p)


COMMAND = Command("bench", "throughput / latency / memory of backends, side by side", add_arguments, run,
                  order=40)
