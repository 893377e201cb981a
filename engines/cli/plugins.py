"""Commands and demo steps the shells plug in through entry points (pyproject.toml).

``serve_app`` and ``data_jobs`` declare theirs in the ``arcface.commands`` and
``arcface.demo_steps`` groups, the way vLLM's and Polygraphy's command registries
work: the library finds them in the installed metadata and never names a shell.
Loading an entry point imports only its module, which must not import Ray at
import time (``arcface --help`` stays Ray-free; a test checks it).
"""

from __future__ import annotations

import logging
from importlib.metadata import entry_points
from typing import TypeVar

logger = logging.getLogger(__name__)

COMMANDS_GROUP = "arcface.commands"
DEMO_STEPS_GROUP = "arcface.demo_steps"

T = TypeVar("T")


def load_plugins(group: str, kind: type[T]) -> list[T]:
    """Every object the installed distributions declare in entry-point ``group``.

    An entry point whose own module is absent (a distribution declaring a shell this
    installation does not ship) is skipped with a warning; any other import error is a
    broken plug-in and propagates, as does an object that is not a ``kind``.
    """
    found: list[T] = []
    for ep in sorted(entry_points(group=group), key=lambda e: e.name):
        try:
            obj = ep.load()
        except ModuleNotFoundError as exc:
            if exc.name and (ep.module == exc.name or ep.module.startswith(exc.name + ".")):
                logger.warning("entry point %s = %s skipped: module %s is not installed",
                               ep.name, ep.value, exc.name)
                continue
            raise
        if not isinstance(obj, kind):
            raise TypeError(f"entry point {ep.name} = {ep.value} in group {group} is a "
                            f"{type(obj).__name__}, not a {kind.__name__}")
        found.append(obj)
    return found
