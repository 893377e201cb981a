"""What every ``arcface`` subcommand shares: exit codes, ``--json``, ``--config``, argument
types, the ``Command`` a module (or a plug-in shell) contributes, and the one map from
errors to exit codes.

Exit codes: 0 success; 1 the command ran but its check failed (drift gate,
benchmark error); 2 bad input (arguments, config, model reference).
With ``--json`` the last line on stdout is one JSON object; logs go to stderr.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..config.loader import load_config
from ..config.schema import BACKEND_NAMES, Config
from ..errors import ConfigError, EngineError, ModelResolutionError

logger = logging.getLogger("arcface")

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT = 0, 1, 2
CONFIG_HELP = "config YAML (default: $ARCFACE_CONFIG or config/embedding.yaml)"


@dataclass(frozen=True)
class Command:
    """One ``arcface`` subcommand: its parser and what it runs.

    Built-in commands live in ``engines/cli/``; ``serve_app`` and ``data_jobs`` contribute
    theirs through the ``arcface.commands`` entry-point group (pyproject.toml), so this
    package never names its shells. ``order`` is the position in ``arcface --help``;
    ``parser_kwargs`` go to ``add_parser`` (e.g. a pass-through command's ``add_help``).
    ``add_arguments`` must not import Ray: building the parser is what ``--help`` costs.
    """

    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]
    order: int = 100
    parser_kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class DemoStep:
    """A step of ``arcface demo`` a shell contributes (``arcface.demo_steps`` entry points).

    ``run(cfg, model, workdir, verbose=False)`` returns a dict with ``name`` and ``ok``; a step
    that starts Ray calls ``quiet_console("ray")`` unless ``verbose`` (``arcface demo
    --verbose``). ``arcface demo --skip-<name>`` skips it (``skip_help`` is that flag's help);
    steps run by ``order``.
    """

    name: str
    order: int
    skip_help: str
    run: Callable[..., dict[str, Any]]


def quiet_console(prefix: str, level: int = logging.ERROR) -> None:
    """Let only ``level`` and above of the loggers under ``prefix`` (e.g. ``"ray"``) reach the
    terminal; their log files keep everything. A library's own INFO and WARNING lines (Ray's
    start-up notices, Ray Data's progress dumps, retried-task warnings) drown the story a
    command tells. Applies to the loggers configured so far: call it after importing the
    library's modules (Ray configures its loggers on import)."""
    for name, found in logging.root.manager.loggerDict.items():
        if not isinstance(found, logging.Logger) or (name != prefix and not name.startswith(prefix + ".")):
            continue
        for handler in found.handlers:
            if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
                handler.setLevel(max(handler.level, level))


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


def positive_ints(text: str) -> list[int]:
    """``1,8,256`` -> ``[1, 8, 256]``: one or more positive integers (batch sizes, face counts)."""
    try:
        values = [int(n) for n in text.split(",") if n.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"comma-separated positive integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"comma-separated positive integers, got {text!r}")
    return values


def load_cfg(args: argparse.Namespace, **overrides: Any) -> Config:
    """The config ``--config`` names (default: ``$ARCFACE_CONFIG`` or config/embedding.yaml),
    with ``overrides`` (dotted keys; ``None`` values ignored) applied last."""
    return load_config(getattr(args, "config", None), overrides=overrides)


def add_config(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help=CONFIG_HELP)


def add_common(p: argparse.ArgumentParser, model: bool = True) -> None:
    add_config(p)
    if model:
        p.add_argument("--model", help="model reference (default: embedding.model from config)")


def run_with_exit_codes(prog: str, fn: Callable[[], int]) -> int:
    """Run ``fn`` and turn the project's errors into exit codes, in one place for every command:
    bad input (config, model reference, ``ValueError``) prints ``prog: error: ...`` and
    returns 2; any other ``EngineError`` (a check or a runtime failed) prints ``prog: ...``
    and returns 1; Ctrl-C returns 130. Anything else is a bug and propagates with its traceback."""
    try:
        return fn()
    except (ConfigError, ModelResolutionError, ValueError) as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except EngineError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        return 130
