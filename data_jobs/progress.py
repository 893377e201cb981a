"""Progress you can watch: a live line, and ``<output>/progress.json`` for other processes.

The line is a tqdm bar over the episodes to commit when stderr is a terminal, and a
log line every ``progress_interval_s`` seconds otherwise (``ray job logs``, CI):
episodes committed / total, faces embedded, faces/s, ETA. ``progress.json`` (local or
``s3://``, written atomically: a reader never sees half of it) is rewritten on the same
clock while the job runs (``state: running``) and once more at the end (``done`` with
the final report, or ``failed`` with the error), so a dashboard or a scheduler can poll
it. Its fields are in the README ("Progress"). Counts of faces while running come from
the staging writes (a write Ray retried may be counted twice until it commits); the
final ones are the commits'.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from engines import Location, write_atomic

logger = logging.getLogger("data_jobs.progress")

PROGRESS_FILE = "progress.json"


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


@dataclass
class Progress:
    output: Location
    input: str
    episodes: int  # episodes of the input
    skipped: int  # already committed before this run
    rows_total: int  # rows this run embeds (or decodes, for the ones that fail)
    interval_s: float = 10.0
    committed: list[str] = field(default_factory=list)
    rows_staged: int = 0
    faces_embedded: int = 0
    failures: int = 0
    started: float = field(default_factory=time.monotonic)
    started_at: str = field(default_factory=_now)
    _last: float = 0.0
    _bar: Any = None

    def __post_init__(self) -> None:
        if sys.stderr.isatty():
            from tqdm import tqdm

            self._bar = tqdm(
                total=self.episodes - self.skipped,
                unit="episode",
                desc="episodes committed",
                file=sys.stderr,
                dynamic_ncols=True,
            )
        self.write("running")

    @property
    def progress_path(self) -> Location:
        return self.output.join(PROGRESS_FILE)

    def rates(self) -> tuple[float, float, float | None]:
        """(elapsed s, faces/s, ETA s or None): the ETA from the rate rows are staged at."""
        elapsed = time.monotonic() - self.started
        fps = self.faces_embedded / elapsed if elapsed > 0 else 0.0
        row_rate = self.rows_staged / elapsed if elapsed > 0 else 0.0
        left = max(0, self.rows_total - self.rows_staged)
        eta = left / row_rate if row_rate > 0 else (0.0 if not left else None)
        return elapsed, fps, eta

    def snapshot(self, state: str) -> dict[str, Any]:
        elapsed, fps, eta = self.rates()
        return {
            "state": state,
            "input": self.input,
            "output": self.output.uri,
            "episodes_total": self.episodes,
            "episodes_skipped": self.skipped,
            "episodes_committed": len(self.committed),
            "episodes_to_commit": self.episodes - self.skipped,
            "rows_total": self.rows_total,
            "rows_staged": self.rows_staged,
            "faces_embedded": self.faces_embedded,
            "failures": self.failures,
            "faces_per_s": round(fps, 2),
            "eta_s": None if eta is None else round(eta, 1),
            "elapsed_s": round(elapsed, 2),
            "started_at": self.started_at,
            "updated_at": _now(),
            "committed": self.committed,
        }

    def write(self, state: str, **extra: Any) -> None:
        loc = self.progress_path
        try:
            write_atomic(loc.fs, loc.path, json.dumps({**self.snapshot(state), **extra}, indent=1).encode())
        except OSError as exc:  # a progress file is not worth failing a job for
            logger.warning("cannot write %s: %s", loc.uri, exc)

    def line(self) -> str:
        _, fps, eta = self.rates()
        eta_text = "?" if eta is None else f"{eta:.0f} s"
        return (
            f"episodes {len(self.committed)}/{self.episodes - self.skipped} committed, "
            f"{self.faces_embedded} faces embedded, {fps:.1f} faces/s, ETA {eta_text}"
        )

    def update(
        self, rows_staged: int, faces_embedded: int, committed: list[str] | None = None, failures: int = 0
    ) -> None:
        """New counts (staging totals; episodes just committed, with their error rows)."""
        self.rows_staged, self.faces_embedded = (
            max(self.rows_staged, rows_staged),
            max(self.faces_embedded, faces_embedded),
        )
        self.failures += failures
        if committed:
            self.committed += committed
            if self._bar is not None:
                self._bar.update(len(committed))
        if self._bar is not None:
            self._bar.set_postfix_str(
                f"{self.faces_embedded} faces, {self.rates()[1]:.1f} faces/s", refresh=False
            )
        now = time.monotonic()
        if now - self._last >= self.interval_s:
            self._last = now
            if self._bar is None:
                logger.info("%s", self.line())
            self.write("running")

    def close(self, state: str, **extra: Any) -> None:
        if self._bar is not None:
            self._bar.close()
        logger.info("%s (%s)", self.line(), state)
        self.write(state, **extra)
