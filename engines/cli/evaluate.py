"""``arcface evaluate``: verification accuracy of backends and precisions on labelled faces."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..config.schema import PRECISIONS
from .common import EXIT_OK, Command, add_common, emit_json, load_cfg, positive_int


def _spec(text: str):
    from ..evaluate.run import EngineSpec

    try:
        return EngineSpec.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def run(args: argparse.Namespace) -> int:
    from ..evaluate.labelled import identity_pairs, load_identity_dir, load_pairs_file
    from ..evaluate.run import EngineSpec, plot_roc, run_evaluation
    from ..factory import configured_model

    cfg = load_cfg(args)
    model = configured_model(cfg, args.model)
    if args.faces:
        faces = load_identity_dir(Path(args.faces))
        pairs = identity_pairs(faces.identities, args.impostors, args.seed)
    else:
        faces, pairs = load_pairs_file(Path(args.pairs))
    specs = [EngineSpec(args.backend or cfg.embedding.backend, args.precision), *args.compare]
    report = run_evaluation(faces, pairs, specs, model, cfg, folds=args.folds, resamples=args.bootstrap,
                            seed=args.seed)
    if args.plot:
        plot_roc(report, pairs, Path(args.plot))
        report["plot"] = args.plot
    scores = report.pop("_scores")
    if args.out:
        Path(args.out).write_text(json.dumps({**report, "scores": [s.tolist() for s in scores],
                                              "same": pairs.same.tolist()}, indent=1))
    if args.json:
        emit_json(report)
    else:
        print(format_report(report))
    return EXIT_OK


def format_report(report: dict) -> str:
    first = report["engines"][0]["metrics"]
    lines = [f"{report['model']}{' (SYNTHETIC)' if report['synthetic'] else ''}: {report['faces']} faces, "
             f"{first['pairs']} pairs ({first['genuine']} genuine, {first['impostors']} impostor)"]
    head = (f"{'engine':<18} {'accuracy (k-fold)':>17} {'TAR@1e-2':>9} {'TAR@1e-3':>9} {'TAR@1e-4':>9} "
            f"{'AUC':>7} {'EER':>7}")
    lines += [head, "-" * len(head)]
    for result in report["engines"]:
        m = result["metrics"]
        acc = m["accuracy_kfold"]
        tars = [f"{t['tar']:.4f}" + ("" if t["resolvable"] else "*") for t in m["tar_at_far"]]
        lines.append(f"{result['engine']['spec']:<18} {acc['mean']:>8.4f} ± {acc['std']:.4f} "
                     f"{tars[0]:>9} {tars[1]:>9} {tars[2]:>9} {m['roc_auc']:>7.4f} {m['eer']['rate']:>7.4f}")
    if any(not t["resolvable"] for r in report["engines"] for t in r["metrics"]["tar_at_far"]):
        lines.append("* fewer impostor pairs than 1/FAR: that FAR is not resolvable with this set")
    for d in report["deltas"]:
        ci = f"{d['confidence']:.0%} CI {d['ci_low']:+.5f} .. {d['ci_high']:+.5f}"
        lines.append(f"{d['metric']:<14} {d['engine_b']} - {d['engine_a']}: {d['b']:.5f} - {d['a']:.5f} = "
                     f"{d['delta']:+.5f} ({ci})")
    if report.get("note"):
        lines.append(report["note"])
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--faces", metavar="DIR", help="labelled faces: DIR/<identity>/<image> (crops, or "
                        "images with a <image>.json landmarks sidecar); all genuine pairs, sampled impostors")
    source.add_argument("--pairs", metavar="FILE",
                        help="CSV/TSV with header a,b,same; paths relative to FILE")
    p.add_argument("--backend", help="the first engine (default: embedding.backend)")
    p.add_argument("--precision", choices=PRECISIONS, help="its precision (default: embedding.precision)")
    p.add_argument("--compare", type=_spec, nargs="*", default=[], metavar="BACKEND[:PRECISION]",
                   help="more engines, each compared with the first (delta with a bootstrap interval)")
    p.add_argument("--impostors", type=positive_int,
                   help="impostor pairs with --faces (default: as many as genuine)")
    p.add_argument("--folds", type=positive_int, default=10,
                   help="cross-validation folds for accuracy (LFW: 10)")
    p.add_argument("--bootstrap", type=positive_int, default=1000, help="bootstrap resamples for the deltas")
    p.add_argument("--seed", type=int, default=0, help="impostor sampling and bootstrap seed")
    p.add_argument("--plot", metavar="PNG", help="write the ROC curves here")
    p.add_argument("--out", metavar="JSON", help="write the report with every pair's scores here")
    p.add_argument("--json", action="store_true")
    add_common(p)


COMMAND = Command("evaluate", "verification accuracy of backends/precisions on labelled faces",
                  add_arguments, run, order=35)
