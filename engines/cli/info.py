"""``arcface info``: start a backend through the fallback chain and print its diagnostics."""

from __future__ import annotations

import argparse
from typing import Any

from ..config.schema import BACKEND_NAMES, PRECISIONS
from .common import EXIT_OK, Command, add_common, backend_list, emit_json, load_cfg, logger


def run(args: argparse.Namespace) -> int:
    from ..factory import get_engine

    cfg = load_cfg(args)
    engine = get_engine(
        args.backend or cfg.embedding.backend,
        args.model,
        precision=args.precision,
        device=args.device,
        fallback=args.fallback,
        config=cfg,
    )
    info = engine.info.to_dict()
    info["model"] = engine.graph.to_dict()  # the graph that runs (a converted one, where converted)
    info["onnxruntime"] = _onnxruntime_build()
    emit_json(info)
    return EXIT_OK


def _onnxruntime_build() -> dict[str, Any]:
    """Which onnxruntime build answers (CPU or GPU distribution), whatever backend runs."""
    try:
        from ..backends.onnx import onnxruntime_build

        build = onnxruntime_build()
    except ImportError as exc:
        return {"error": f"onnxruntime not importable: {exc}"}
    if "warning" in build:
        logger.warning("%s", build["warning"])
    return build


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backend", choices=BACKEND_NAMES)
    p.add_argument("--precision", choices=PRECISIONS)
    p.add_argument("--device", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--fallback", type=backend_list, help="comma-separated fallback backends")
    add_common(p)


COMMAND = Command("info", "start a backend and print its diagnostic JSON", add_arguments, run, order=20)
