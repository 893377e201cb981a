"""``arcface models make | info | convert``: resolve, describe or convert a model."""

from __future__ import annotations

import argparse
from dataclasses import replace

from .common import EXIT_OK, Command, add_common, emit_json, load_cfg, positive_int


def run(args: argparse.Namespace) -> int:
    from ..factory import configured_model

    cfg = load_cfg(args)
    model = configured_model(cfg, args.ref)
    if args.models_cmd == "convert":
        from ..drift_gate import conversion_drift
        from ..models.precision import convert_model

        source = model
        quantization = cfg.quantization
        if args.calibration_size:
            quantization = replace(quantization, calibration_faces=args.calibration_size)
        model = convert_model(model, args.precision, cache_dir=cfg.storage.cache_dir,
                              quantization=quantization)
    out = model.to_dict()
    if model.precision == "int8":
        from ..models.precision import int8_facts

        out["int8"] = int8_facts(model.path)
    if args.models_cmd == "convert":
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
        if out.get("int8"):
            print(f"int8    {out['int8']['summary']}")
        if "drift_vs_fp32" in out:
            d = out["drift_vs_fp32"]
            print(f"drift   vs fp32 on this CPU ({d['n']} faces, {d['measured_with']}): min cosine "
                  f"{d['min_cosine_sim']:.6f}, mean {d['mean_cosine_sim']:.6f}, "
                  f"{'within' if d['passed'] else 'OUTSIDE'} max_drift_cosine {d['max_drift']}")
        if out["synthetic"]:
            print("NOTE    synthetic model: seeded random weights, not a trained face model")
    return EXIT_OK


def add_arguments(p: argparse.ArgumentParser) -> None:
    msub = p.add_subparsers(dest="models_cmd", required=True)
    for name, text in (("make", "resolve/generate a model, print its path and sha256"),
                       ("info", "same as make: resolve and describe a model")):
        mp_ = msub.add_parser(name, help=text)
        mp_.add_argument("ref", help="synthetic:<arch>, a path, s3://..., or a pack name")
        add_common(mp_, model=False)
        mp_.add_argument("--json", action="store_true")
    cp = msub.add_parser("convert", help="write an fp16 or int8 (Q/DQ) graph of a model")
    cp.add_argument("ref", help="an fp32 model reference")
    cp.add_argument("--precision", required=True, choices=["fp16", "int8"])
    cp.add_argument("--calibration-size", type=positive_int,
                    help="jittered real faces that calibrate int8 (default: quantization.calibration_faces)")
    add_common(cp, model=False)
    cp.add_argument("--json", action="store_true")


COMMAND = Command("models", "make, inspect or convert models", add_arguments, run, order=10)
