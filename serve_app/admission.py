"""Admission to one replica's batch queue, bounded in faces and in time (no Ray in here).

Serve bounds requests per replica (``max_ongoing_requests``) and in the proxy's queue
(``max_queued_requests``); neither knows that one request may hold 256 faces and another one,
or how fast this replica's engine is. Here a request is admitted only if

- the faces pending on the replica stay within ``max_pending_faces`` (memory), and
- the wait it would have before its first batch starts is within ``max_wait_s``
  (``max_queue_wait_s``). Batching decides that wait: a request joins the next batch unless
  the faces queued ahead of it fill whole batches first, so it waits for what is left of the
  running batch plus ``queued // max_batch`` full batches. Durations come from a line fitted
  to the last ``RATE_WINDOW`` batches, ``seconds = overhead + faces x per_face`` (small
  batches at low load, expensive per face, do not make a burst look slower than it is);

otherwise it gets 503 ``overloaded`` at once, with ``Retry-After``. A request admitted on a
prediction that turns out wrong is still bounded: a chunk whose request has not started within
``max_wait_s`` of being queued is dropped when its batch forms (503 ``queue_timeout``), so no
accepted request waits longer than that for the engine. Together they keep the accepted
requests' latency near ``max_queue_wait_s`` plus one batch, whatever the offered load.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field

from .errors import RequestError

RATE_WINDOW = 64  # batches the cost estimate looks back on


@dataclass(eq=False)
class Ticket:
    """One admitted request: its faces, when it was queued and whether its work has started."""

    faces: int
    queued_at: float = field(default_factory=time.monotonic)
    started: bool = False
    expired: bool = False


class Admission:
    """The admission state of one replica (thread-safe: batches finish on the encode thread)."""

    def __init__(self, max_pending_faces: int, max_wait_s: float, max_batch: int = 32) -> None:
        self.max_pending_faces = max_pending_faces
        self.max_wait_s = max_wait_s
        self.max_batch = max_batch  # faces per engine batch (kept in step by the deployment)
        self.pending_faces = 0  # admitted and not finished
        self._batches: deque[tuple[int, float]] = deque(maxlen=RATE_WINDOW)  # (faces, seconds)
        self._cost: tuple[float, float] | None = None  # (overhead s, s per face), fitted
        self._running: tuple[int, float] | None = None  # the batch on the engine: (faces, since)
        self.rejected = 0
        self.expired = 0
        self.start_waits: deque[float] = deque(maxlen=1000)  # s from admission to first batch, recent
        self._lock = threading.Lock()

    def batch_s(self, faces: int) -> float:
        """The fitted duration of an engine batch of ``faces`` (0 before one was measured)."""
        if self._cost is None:
            return 0.0
        overhead, per_face = self._cost
        return overhead + faces * per_face

    @property
    def faces_per_s(self) -> float | None:
        """The engine's throughput in full batches, from the fitted cost (None before a batch)."""
        if self._cost is None:
            return None
        return self.max_batch / max(self.batch_s(self.max_batch), 1e-9)

    def predicted_wait_s(self, now: float | None = None) -> float:
        """Seconds until a request queued now would start: what is left of the running batch,
        then one full batch per ``max_batch`` faces queued ahead (fewer join its own batch)."""
        now = time.monotonic() if now is None else now
        left, running = 0.0, 0
        if self._running is not None:
            running, since = self._running
            left = max(0.0, self.batch_s(running) - (now - since))
        queued = max(0, self.pending_faces - running)
        return left + (queued // self.max_batch) * self.batch_s(self.max_batch)

    def check_open(self) -> None:
        """Cheap refusal before a request's body is even read: the queue alone already waits
        longer than ``max_wait_s``."""
        wait = self.predicted_wait_s()
        if wait > self.max_wait_s:
            self._refuse(f"a request would wait about {wait:.2f} s for the engine, more than "
                         f"max_queue_wait_s ({self.max_wait_s:g} s)")

    def admit(self, faces: int) -> Ticket:
        with self._lock:
            if self.pending_faces + faces > self.max_pending_faces:
                self._refuse(f"{self.pending_faces} faces pending, {faces} more would pass "
                             f"max_pending_faces ({self.max_pending_faces})")
            wait = self.predicted_wait_s()
            if wait > self.max_wait_s:
                self._refuse(f"it would wait about {wait:.2f} s for the engine, more than "
                             f"max_queue_wait_s ({self.max_wait_s:g} s)")
            self.pending_faces += faces
        return Ticket(faces)

    def release(self, ticket: Ticket) -> None:
        with self._lock:
            self.pending_faces -= ticket.faces

    def start_batch(self, tickets: list[Ticket], faces: list[int], now: float | None = None) -> list[bool]:
        """Called as a batch of chunks (of ``faces`` each) forms: which run (``True``) and which
        are dropped because their request waited past ``max_wait_s`` without starting."""
        now = time.monotonic() if now is None else now
        keep = []
        with self._lock:
            for ticket in tickets:
                if not ticket.started and not ticket.expired and now - ticket.queued_at > self.max_wait_s:
                    ticket.expired = True
                    self.expired += 1
                if ticket.expired:
                    keep.append(False)
                    continue
                if not ticket.started:
                    ticket.started = True
                    self.start_waits.append(now - ticket.queued_at)
                keep.append(True)
            live = sum(n for n, k in zip(faces, keep, strict=True) if k)
            self._running = (live, now) if live else None
        return keep

    def finish_batch(self, faces: int, encode_s: float) -> None:
        with self._lock:
            self._running = None
            if faces > 0 and encode_s > 0:
                self._batches.append((faces, encode_s))
                self._cost = _fit(self._batches)

    def _refuse(self, why: str) -> None:
        self.rejected += 1
        raise RequestError(503, "overloaded", f"replica at capacity: {why}; retry later")

    def expired_error(self, ticket: Ticket) -> RequestError:
        waited = time.monotonic() - ticket.queued_at
        return RequestError(503, "queue_timeout",
                            f"the request waited {waited:.2f} s without reaching the engine, more than "
                            f"max_queue_wait_s ({self.max_wait_s:g} s); retry later")

    def summary(self) -> dict:
        overhead, per_face = self._cost or (None, None)
        return {
            "pending_faces": self.pending_faces,
            "faces_per_s": self.faces_per_s,
            "batch_overhead_s": overhead,
            "seconds_per_face": per_face,
            "predicted_wait_s": self.predicted_wait_s(),
            "max_queue_wait_s": self.max_wait_s,
            "max_pending_faces": self.max_pending_faces,
            "rejected_overloaded": self.rejected,
            "dropped_queue_timeout": self.expired,
            "max_start_wait_s": max(self.start_waits) if self.start_waits else None,  # recent requests
        }


def _fit(batches) -> tuple[float, float]:
    """``(overhead, per_face)`` of ``seconds = overhead + faces x per_face``, least squares over
    ``batches``, both terms kept >= 0; with a single batch size, all of it per face (through the
    origin: pessimistic for larger batches, right for the size seen)."""
    n = len(batches)
    mean_b = sum(b for b, _ in batches) / n
    mean_t = sum(t for _, t in batches) / n
    var = sum((b - mean_b) ** 2 for b, _ in batches)
    if var > 0:
        per_face = sum((b - mean_b) * (t - mean_t) for b, t in batches) / var
        overhead = mean_t - per_face * mean_b
        if per_face >= 0 and overhead >= 0:
            return overhead, per_face
    total_b = sum(b for b, _ in batches)
    return 0.0, sum(t for _, t in batches) / total_b
