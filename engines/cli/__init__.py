"""The ``arcface`` command (also ``python -m engines``): one module per subcommand.

Built-in subcommands live here (``models``, ``info``, ``compare``, ``bench``,
``demo``, ``build``, ``engines``, ``gallery``); the shells add theirs (``serve``,
``bench-serve``, ``embed-episodes``, ``sample-episodes``) through the
``arcface.commands`` entry points, so this package never imports ``serve_app``,
``data_jobs`` or Ray. Exit codes and ``--json``: see ``common``.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from . import bench, compare, demo, evaluate, gallery, info, models, plans
from .common import (
    EXIT_BAD_INPUT,
    EXIT_FAILED,
    EXIT_OK,
    Command,
    DemoStep,
    backend_list,
    emit_json,
    positive_int,
    positive_ints,
    run_with_exit_codes,
)
from .plugins import COMMANDS_GROUP, load_plugins

BUILT_IN = (models.COMMAND, info.COMMAND, compare.COMMAND, evaluate.COMMAND, gallery.COMMAND, bench.COMMAND,
            demo.COMMAND, plans.BUILD, plans.ENGINES)

__all__ = [
    "EXIT_BAD_INPUT",
    "EXIT_FAILED",
    "EXIT_OK",
    "Command",
    "DemoStep",
    "backend_list",
    "build_parser",
    "commands",
    "emit_json",
    "main",
    "positive_int",
    "positive_ints",
    "run_with_exit_codes",
]


def commands() -> list[Command]:
    """Built-in and plugged-in subcommands, in ``--help`` order; a name taken twice is an error."""
    found = [*BUILT_IN, *load_plugins(COMMANDS_GROUP, Command)]
    names = [c.name for c in found]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise RuntimeError(f"arcface subcommand(s) {twice} are registered more than once")
    return sorted(found, key=lambda c: c.order)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="arcface",
        description="ArcFace embeddings at scale: backends, drift, benchmarks, serving, jobs.",
    )
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING (default INFO)")
    sub = parser.add_subparsers(dest="cmd", required=True)
    for command in commands():
        p = sub.add_parser(command.name, help=command.help, **command.parser_kwargs)
        command.add_arguments(p)
        p.set_defaults(_run=command.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, str(args.log_level).upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    return run_with_exit_codes(f"arcface {args.cmd}", lambda: args._run(args))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
