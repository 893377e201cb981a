"""An ordered chain of backends: the first that starts (and passes the drift gate) serves.

A backend that cannot start on this host (no GPU, no TensorRT, no engine and
no build allowed, a missing package) yields to the next one; with the startup
drift gate on, so does a backend whose embeddings drift from the reference.
The report of what was tried and why it was skipped travels in
``EngineInfo.fallback``, so ``/v1/info`` and ``arcface info`` say which
backend runs and why the others do not.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from .base.engine import BaseEngine
from .drift import DriftReport
from .errors import BackendUnavailable, EngineError

logger = logging.getLogger(__name__)


@dataclass
class Attempt:
    backend: str
    status: str  # selected | unavailable | drift_refused | gate_failed | failed
    reason: str | None = None
    seconds: float = 0.0
    drift: dict[str, Any] | None = None


@dataclass
class FallbackReport:
    requested: str
    chain: list[str]
    selected: str | None = None
    attempts: list[Attempt] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "requested": self.requested,
            "chain": self.chain,
            "selected": self.selected,
            "attempts": [asdict(a) for a in self.attempts],
        }

    def failure_message(self) -> str:
        lines = [f"no backend could start (chain {self.chain}):"]
        lines += [f"  - {a.backend}: {a.status}: {a.reason}" for a in self.attempts]
        return "\n".join(lines)


class ChainExhausted(BackendUnavailable):
    """Every backend of the chain failed to start or was refused by the drift gate."""

    def __init__(self, report: FallbackReport) -> None:
        super().__init__(report.failure_message())
        self.report = report


_EXPECTED = (EngineError, ImportError, OSError, RuntimeError)


def _record_failed_start(report: FallbackReport, name: str, exc: Exception, started: float,
                         engine: BaseEngine | None) -> None:
    status = "unavailable" if isinstance(exc, EngineError) else "failed"
    reason = f"could not start: {type(exc).__name__}: {exc}"
    report.attempts.append(Attempt(name, status, reason, time.perf_counter() - started))
    # an unexpected exception type may be a bug, not this host: keep its traceback in the log
    logger.warning("backend %s %s, trying the next one: %s", name, status, reason,
                   exc_info=not isinstance(exc, _EXPECTED))
    if engine is not None:
        try:
            engine.close()
        except Exception as close_exc:  # a half-started backend must not hide why it failed
            logger.warning("closing backend %s after its failed start: %s", name, close_exc)


def start_chain(
    requested: str,
    chain: Sequence[str],
    make_engine: Callable[[str], BaseEngine],
    drift_gate: Callable[[BaseEngine], DriftReport | None] | None = None,
) -> tuple[BaseEngine, FallbackReport]:
    """Start the first backend of ``chain`` that works.

    ``make_engine(name)`` builds (not starts) a backend; ``drift_gate(engine)``
    returns a gated ``DriftReport`` or ``None`` when no check applies.

    Any error while a backend *starts* means it could not start here: it is
    recorded with its reason (``unavailable`` for the ``EngineError`` family,
    ``failed`` for anything else, such as a runtime's ``ValueError`` on an engine
    it cannot size) and the next backend is tried; a ``failed`` start is logged
    with its traceback, since it may be a bug rather than this host. Building the
    backend object (``make_engine``: configuration) and running the gate keep the
    narrower rule: expected failures (``EngineError``, ``ImportError``,
    ``OSError``, ``RuntimeError``) move on, programming errors propagate.
    Nothing left: ``ChainExhausted``.
    """
    report = FallbackReport(requested=requested, chain=list(chain))
    for name in chain:
        started = time.perf_counter()
        engine: BaseEngine | None = None
        try:
            engine = make_engine(name)
        except _EXPECTED as exc:
            _record_failed_start(report, name, exc, started, None)
            continue
        try:
            engine.ensure_ready()
        except Exception as exc:  # could not start, whatever the reason: say it, try the next
            _record_failed_start(report, name, exc, started, engine)
            continue
        if drift_gate is not None:
            try:
                drift = drift_gate(engine)
            except _EXPECTED as exc:
                # e.g. the reference backend cannot start: this candidate is unproven, not refused
                reason = f"drift gate could not run: {type(exc).__name__}: {exc}"
                report.attempts.append(Attempt(name, "gate_failed", reason, time.perf_counter() - started))
                logger.warning("backend %s skipped, %s", name, reason)
                engine.close()
                continue
            if drift is not None and not drift.passed:
                reason = f"drift gate refused it: {drift.summary()}"
                report.attempts.append(
                    Attempt(name, "drift_refused", reason, time.perf_counter() - started, drift.to_dict())
                )
                logger.warning("backend %s %s", name, reason)
                engine.close()
                continue
            drift_dict = drift.to_dict() if drift is not None else None
        else:
            drift_dict = None
        report.attempts.append(
            Attempt(name, "selected", None, time.perf_counter() - started, drift_dict)
        )
        report.selected = name
        logger.info("serving with backend %s (chain %s)", name, list(chain))
        return engine, report
    raise ChainExhausted(report)
