"""Backend name -> class, filled by ``@register`` in each backend module.

Backend modules import their runtimes lazily, so importing them all here is
cheap and works with only the base dependencies installed.
"""

from __future__ import annotations

import importlib
from typing import TypeVar

from ..base.engine import BaseEngine

_BACKENDS: dict[str, type[BaseEngine]] = {}
_BACKEND_MODULES = (
    "engines.backends.onnx",
    "engines.backends.insightface",
    "engines.backends.tensorrt",
    "engines.backends.openvino",
)
_loaded = False

T = TypeVar("T", bound=type[BaseEngine])


def register(name: str):
    """Class decorator: make a backend available under ``name``."""

    def decorate(cls: T) -> T:
        if name in _BACKENDS and _BACKENDS[name] is not cls:
            raise ValueError(f"backend {name!r} registered twice ({_BACKENDS[name]!r}, {cls!r})")
        cls.name = name
        _BACKENDS[name] = cls
        return cls

    return decorate


def _load_all() -> None:
    global _loaded
    if _loaded:
        return
    for module in _BACKEND_MODULES:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name != module:  # a backend module's own import is broken: say so
                raise
    _loaded = True


def backend_names() -> list[str]:
    _load_all()
    return sorted(_BACKENDS)


def get_backend_class(name: str) -> type[BaseEngine]:
    _load_all()
    try:
        return _BACKENDS[name]
    except KeyError:
        raise ValueError(
            f"unknown backend {name!r}; available backends: {sorted(_BACKENDS)} (or 'auto')"
        ) from None


def available_backends() -> dict[str, str | None]:
    """Every registered backend -> ``None`` if it can start here, else why not."""
    _load_all()
    return {name: cls.availability() for name, cls in sorted(_BACKENDS.items())}
