"""One exception family for the whole engine package.

Shells (Serve, Data, CLI) translate these into status codes and exit codes in one
place each, so every subclass carries a message that already says what was
expected, what was found and what to do about it.
"""

from __future__ import annotations


class EngineError(Exception):
    """Base class of every error raised on purpose by ``engines``."""


class BackendUnavailable(EngineError):
    """The backend cannot start on this host (missing package, no device, no engine).

    The fallback chain treats this as "try the next backend"; the message ends
    up in ``EngineInfo.fallback`` so operators see why a backend was skipped.
    """


class ModelResolutionError(EngineError):
    """A model reference could not be turned into a local ONNX file."""


class ConfigError(EngineError):
    """A configuration file or override is malformed (unknown key, bad value)."""


class DriftGateError(EngineError):
    """A backend's embeddings drifted from the reference beyond the allowed bound."""


class EngineBuildError(EngineError):
    """Building or loading a serialized engine (TensorRT plan) failed."""


class ChecksumMismatch(EngineError):
    """Downloaded or cached bytes do not hash to the sha256 they were published with.

    Never load such a file: discard it, then download it again or rebuild it.
    """


def missing_extra(package: str, extra: str | None, purpose: str, also: str = "") -> BackendUnavailable:
    """Build the standard "install the extra" error for a lazily imported runtime.

    ``extra`` is the pip extra that provides ``package`` (see pyproject.toml); ``None``
    for a base dependency, whose absence means a broken install, not a missing extra.
    ``also`` is appended to the hint (e.g. another distribution of the same module).
    """
    if extra is None:
        hint = f"it is a base dependency of arcface-ray; reinstall the project: pip install -e .{also}"
    else:
        hint = f"install it with: pip install 'arcface-ray[{extra}]'{also}"
    return BackendUnavailable(
        f"{purpose} needs the Python package '{package}', which is not installed; {hint}"
    )


class PlanLoadError(EngineBuildError):
    """A verified plan did not deserialise on this host.

    ``cause`` says whose fault that is: ``out_of_memory`` and ``driver`` are the
    host's (the plan may be fine: keep it), ``incompatible`` and ``unknown`` the
    plan's (quarantine it and rebuild once). ``seen`` is what TensorRT logged.
    """

    def __init__(self, message: str, cause: str = "unknown", seen: list[str] | None = None) -> None:
        super().__init__(message)
        self.cause = cause
        self.seen = list(seen or [])

    @property
    def plan_at_fault(self) -> bool:
        return self.cause in ("incompatible", "unknown")
