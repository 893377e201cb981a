"""The ``arcface`` command (also ``python -m engines``).

Subcommands that need Ray (``serve``, ``bench-serve``, ``embed-episodes``) import
``serve_app`` / ``data_jobs`` lazily, so ``engines`` itself never imports Ray.

Exit codes: 0 success; 1 the command ran but its check failed (drift gate,
benchmark error); 2 bad input (arguments, config, model reference).
With ``--json`` the last line on stdout is one JSON object; logs go to stderr.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .config import BACKEND_NAMES, PRECISIONS
from .errors import ConfigError, EngineError, ModelResolutionError

logger = logging.getLogger("arcface")

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT = 0, 1, 2

_COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {}
_PARSERS: list[Callable[[Any], None]] = []


def command(name: str):
    def decorate(fn: Callable[[argparse.Namespace], int]):
        _COMMANDS[name] = fn
        return fn

    return decorate


def emit_json(obj: Any) -> None:
    """Print ``obj`` as the single JSON line a ``--json`` caller parses."""
    sys.stdout.write(json.dumps(obj, default=_json_default) + "\n")
    sys.stdout.flush()


def _json_default(value: Any) -> Any:
    if hasattr(value, "to_dict"):
        return value.to_dict()
    if hasattr(value, "item"):
        return value.item()
    return str(value)


def backend_list(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    for name in names:
        if name not in BACKEND_NAMES:
            raise argparse.ArgumentTypeError(
                f"unknown backend {name!r}; choose from {', '.join(BACKEND_NAMES)}"
            )
    if not names:
        raise argparse.ArgumentTypeError("need at least one backend")
    return names


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _load_cfg(args: argparse.Namespace, **overrides: Any):
    from .config import load_config

    return load_config(getattr(args, "config", None), overrides=overrides)


def _add_common(p: argparse.ArgumentParser, model: bool = True) -> None:
    p.add_argument("--config", help="config YAML (default: $ARCFACE_CONFIG or config/embedding.yaml)")
    if model:
        p.add_argument("--model", help="model reference (default: embedding.model from config)")


# -- models ------------------------------------------------------------------------
@command("models")
def cmd_models(args: argparse.Namespace) -> int:
    from .models import resolve_model

    cfg = _load_cfg(args)
    model = resolve_model(args.ref, cache_dir=cfg.storage.cache_dir,
                          endpoint_url=cfg.storage.endpoint_url, region=cfg.storage.region)
    if args.models_cmd == "convert":
        from .precision import convert_model

        source = model
        model = convert_model(model, args.precision, cache_dir=cfg.storage.cache_dir,
                              calibration_size=args.calibration_size)
    out = model.to_dict()
    if args.models_cmd == "convert":
        from .precision import conversion_drift

        drift = conversion_drift(source, model, n_faces=cfg.validation.eval_set_size,
                                 max_drift=cfg.validation.max_drift_cosine, cache_dir=cfg.storage.cache_dir)
        out["drift_vs_fp32"] = {k: v for k, v in drift.items() if not k.startswith("histogram")}
    if args.json:
        emit_json(out)
    else:
        print(f"path    {out['path']}")
        print(f"sha256  {out['sha256']}")
        gmacs = out.get("gmacs_per_face")
        print(f"GMACs   {gmacs:.3f} per face" if gmacs else "GMACs   unknown")
        print(f"precision {out['precision']}")
        if "drift_vs_fp32" in out:
            d = out["drift_vs_fp32"]
            print(f"drift   vs fp32 on this CPU ({d['n']} faces, {d['measured_with']}): min cosine "
                  f"{d['min_cosine_sim']:.6f}, mean {d['mean_cosine_sim']:.6f}, "
                  f"{'within' if d['passed'] else 'OUTSIDE'} max_drift_cosine {d['max_drift']}")
        if out["synthetic"]:
            print("NOTE    synthetic model: seeded random weights, not a trained face model")
    return EXIT_OK


def _parser_models(sub) -> None:
    p = sub.add_parser("models", help="make, inspect or convert models")
    msub = p.add_subparsers(dest="models_cmd", required=True)
    for name, text in (("make", "resolve/generate a model, print its path and sha256"),
                       ("info", "same as make: resolve and describe a model")):
        mp_ = msub.add_parser(name, help=text)
        mp_.add_argument("ref", help="synthetic:<arch>, a path, s3://..., or a pack name")
        _add_common(mp_, model=False)
        mp_.add_argument("--json", action="store_true")
    cp = msub.add_parser("convert", help="write an fp16 or int8 (Q/DQ) graph of a model")
    cp.add_argument("ref", help="an fp32 model reference")
    cp.add_argument("--precision", required=True, choices=["fp16", "int8"])
    cp.add_argument("--calibration-size", type=positive_int, default=64,
                    help="jittered real faces used to calibrate int8 (default 64)")
    _add_common(cp, model=False)
    cp.add_argument("--json", action="store_true")


_PARSERS.append(_parser_models)


# -- info ----------------------------------------------------------------------------
@command("info")
def cmd_info(args: argparse.Namespace) -> int:
    from .factory import get_engine

    cfg = _load_cfg(args)
    engine = get_engine(
        args.backend or cfg.embedding.backend,
        args.model,
        precision=args.precision,
        device=args.device,
        fallback=args.fallback,
        config=cfg,
    )
    info = engine.info.to_dict()
    info["model"] = engine.model.to_dict()
    info["onnxruntime"] = _onnxruntime_build()
    emit_json(info)
    return EXIT_OK


def _onnxruntime_build() -> dict[str, Any]:
    """Which onnxruntime build answers (CPU or GPU distribution), whatever backend runs."""
    try:
        from .onnx_backend import onnxruntime_build

        build = onnxruntime_build()
    except ImportError as exc:
        return {"error": f"onnxruntime not importable: {exc}"}
    if "warning" in build:
        logger.warning("%s", build["warning"])
    return build


def _parser_info(sub) -> None:
    p = sub.add_parser("info", help="start a backend and print its diagnostic JSON")
    p.add_argument("--backend", choices=BACKEND_NAMES)
    p.add_argument("--precision", choices=PRECISIONS)
    p.add_argument("--device", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--fallback", type=backend_list, help="comma-separated fallback backends")
    _add_common(p)


_PARSERS.append(_parser_info)


# -- compare -------------------------------------------------------------------------
@command("compare")
def cmd_compare(args: argparse.Namespace) -> int:
    from .drift import run_embedding_regression_tests
    from .factory import get_engine
    from .sample_faces import eval_faces

    cfg = _load_cfg(args)
    model = args.model or cfg.embedding.model
    # no startup gate: this command *is* the drift measurement, and must show a refused path
    engine_a = get_engine(args.backend_a, model, precision=args.precision_a, config=cfg,
                          validate_on_startup=False)
    engine_b = get_engine(args.backend_b, model, precision=args.precision_b, config=cfg,
                          validate_on_startup=False)
    max_drift = cfg.validation.max_drift_cosine if args.max_drift is None else args.max_drift
    faces = eval_faces(args.n_samples, seed=args.seed)
    report = run_embedding_regression_tests(faces, engine_a, engine_b, max_drift)
    info_a, info_b = engine_a.info, engine_b.info
    out = {
        "mean_cosine_sim": report.mean_cosine_sim,
        "min_cosine_sim": report.min_cosine_sim,
        "p01_cosine_sim": report.p01_cosine_sim,
        "max_drift_face_idx": report.max_drift_face_idx,
        "decision_flip_rate": report.decision_flip_rate,
        "max_drift": max_drift,
        "passed": report.passed,
        "n_samples": report.n,
        "histogram": {"edges": report.histogram_edges, "counts": report.histogram_counts},
        "a": {"backend": info_a.backend, "precision": info_a.precision, "model_sha256": info_a.model_sha256},
        "b": {"backend": info_b.backend, "precision": info_b.precision, "model_sha256": info_b.model_sha256},
        "model": info_a.model_id,
        "synthetic": info_a.synthetic,
    }
    if not args.json:
        print(f"{info_a.backend}/{info_a.precision} vs {info_b.backend}/{info_b.precision} "
              f"on {info_a.model_id}{' (SYNTHETIC)' if info_a.synthetic else ''}")
        print(report.summary())
    else:
        emit_json(out)
    return EXIT_OK if report.passed else EXIT_FAILED


def _parser_compare(sub) -> None:
    p = sub.add_parser("compare", help="drift between two backends on the eval faces")
    p.add_argument("--backend-a", required=True, choices=BACKEND_NAMES)
    p.add_argument("--backend-b", required=True, choices=BACKEND_NAMES)
    p.add_argument("--precision-a", choices=PRECISIONS)
    p.add_argument("--precision-b", choices=PRECISIONS)
    p.add_argument("--n-samples", type=positive_int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-drift", type=float, help="default: validation.max_drift_cosine")
    p.add_argument("--json", action="store_true")
    _add_common(p)


_PARSERS.append(_parser_compare)


# -- bench ---------------------------------------------------------------------------
@command("bench")
def cmd_bench(args: argparse.Namespace) -> int:
    if args.report:
        return _bench_report(args)
    from .bench import format_table, machine_info, run_benchmark

    cfg = _load_cfg(args)
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
    )
    failed = any(r.error for r in results)
    if args.json:
        emit_json({"results": [r.to_dict() for r in results], "machine": machine_info()})
    else:
        print(format_table(results))
    return EXIT_FAILED if failed else EXIT_OK


def _bench_report(args: argparse.Namespace) -> int:
    from .bench_report import REPORT_BATCHES, REPORT_MODELS, run_report, summary_markdown, update_readme
    from .hardware import resolve_device

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


def _model_names(text: str) -> list[str]:
    from .synthetic import ARCHITECTURES

    names = [n.strip().removeprefix("synthetic:") for n in text.split(",") if n.strip()]
    bad = [n for n in names if n not in ARCHITECTURES]
    if not names or bad:
        raise argparse.ArgumentTypeError(f"choose from {sorted(ARCHITECTURES)}, got {text!r}")
    return names


def _batch_sizes(text: str) -> list[int]:
    try:
        sizes = [int(n) for n in text.split(",") if n.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"comma-separated positive integers, got {text!r}") from None
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"comma-separated positive integers, got {text!r}")
    return sizes


def _parser_bench(sub) -> None:
    p = sub.add_parser("bench", help="throughput / latency / memory of backends, side by side")
    p.add_argument("--backends", type=backend_list, default=["insightface", "onnx"],
                   help="comma-separated; the first is the speed-up baseline")
    p.add_argument("--batch-size", type=positive_int, default=32)
    p.add_argument("--num-faces", type=positive_int, default=256)
    p.add_argument("--warmup", type=int, default=2, help="warm-up batches per backend")
    p.add_argument("--rounds", type=positive_int, default=4,
                   help="interleaved rounds (A,B,A,B...) to spread machine noise")
    p.add_argument("--precision", choices=PRECISIONS)
    p.add_argument("--device")
    p.add_argument("--json", action="store_true")
    r = p.add_argument_group("report (every backend and precision, several models and batch sizes)")
    r.add_argument("--report", metavar="DIR",
                   help="write DIR/report.json, report.md, report.png (ignores --backends)")
    r.add_argument("--quick", action="store_true",
                   help="report on mobilefacenet at batches 1,8 only (a smoke run)")
    r.add_argument("--models", type=_model_names,
                   help="comma-separated synthetic architectures (default: all three)")
    r.add_argument("--batch-sizes", type=_batch_sizes, help="default: 1,8,32,64")
    r.add_argument("--faces-per-point", type=positive_int,
                   help="faces measured per backend and batch size (default 128)")
    r.add_argument("--readme", metavar="PATH",
                   help="also rewrite PATH's bench-report section from the report")
    _add_common(p)


_PARSERS.append(_parser_bench)


# -- demo ----------------------------------------------------------------------------
@command("demo")
def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(args)


def _parser_demo(sub) -> None:
    p = sub.add_parser("demo", help="the README's main job: model, faces, diagnostics, drift")
    p.add_argument("--skip-serve", action="store_true", help="skip the online service step")
    p.add_argument("--skip-offline", action="store_true", help="skip the offline job step")
    p.add_argument("--workdir", help="where demo data goes (default: a temp dir)")
    _add_common(p)


_PARSERS.append(_parser_demo)


# -- commands that live in the Ray shells (registered lazily) -------------------------
_shells_registered = False


def _register_shell_commands() -> None:
    global _shells_registered
    if _shells_registered:
        return
    _shells_registered = True
    for module in ("serve_app.cli", "data_jobs.cli", "engines.trt_cli"):
        try:
            mod = __import__(module, fromlist=["register"])
        except ModuleNotFoundError as exc:
            if exc.name != module:
                raise
            continue
        mod.register(_PARSERS, _COMMANDS)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="arcface",
        description="ArcFace embeddings at scale: backends, drift, benchmarks, serving, jobs.",
    )
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING (default INFO)")
    sub = parser.add_subparsers(dest="cmd", required=True)
    _register_shell_commands()
    for add in _PARSERS:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, str(args.log_level).upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        return _COMMANDS[args.cmd](args)
    except (ConfigError, ModelResolutionError, ValueError) as exc:
        print(f"arcface {args.cmd}: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except EngineError as exc:
        print(f"arcface {args.cmd}: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
