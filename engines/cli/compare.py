"""``arcface compare``: drift between two backends (or precisions) on the eval faces."""

from __future__ import annotations

import argparse

from ..config.schema import BACKEND_NAMES, PRECISIONS
from .common import EXIT_FAILED, EXIT_OK, Command, add_common, emit_json, load_cfg, positive_int


def run(args: argparse.Namespace) -> int:
    from ..drift import run_embedding_regression_tests
    from ..factory import get_engine
    from ..models.sample_faces import eval_faces

    cfg = load_cfg(args)
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


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backend-a", required=True, choices=BACKEND_NAMES)
    p.add_argument("--backend-b", required=True, choices=BACKEND_NAMES)
    p.add_argument("--precision-a", choices=PRECISIONS)
    p.add_argument("--precision-b", choices=PRECISIONS)
    p.add_argument("--n-samples", type=positive_int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-drift", type=float, help="default: validation.max_drift_cosine")
    p.add_argument("--json", action="store_true")
    add_common(p)


COMMAND = Command("compare", "drift between two backends on the eval faces", add_arguments, run, order=30)
