"""Admission to one replica's batch queue, bounded in faces and in time (no Ray in here).

Serve bounds requests per replica (``max_ongoing_requests``) and in the proxy's queue
(``max_queued_requests``); neither knows that one request may hold 256 faces and another one,
or how fast this replica's engine is. Here a request is admitted only if

- the faces pending on the replica stay within ``max_pending_faces`` (memory), and
- the wait it would have before its first batch starts, predicted from the faces ahead of it
  and the engine's throughput (faces/s: the best of the last ``RATE_WINDOW`` batches, and never
  less than the rate the replica measured at warm-up on one full batch, ``floor_faces_per_s``:
  small batches at low load, or after a quiet spell or a restart, are slow per face, and must
  not make the estimate pessimistic when a burst arrives, as batches then fill up), is within
  ``max_wait_s`` (``max_queue_wait_s``);

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

RATE_WINDOW = 64  # batches the throughput estimate looks back on


@dataclass(eq=False)
class Ticket:
    """One admitted request: its faces, when it was queued and whether its work has started."""

    faces: int
    queued_at: float = field(default_factory=time.monotonic)
    started: bool = False
    expired: bool = False


class Admission:
    """The admission state of one replica (thread-safe: batches finish on the encode thread)."""

    def __init__(self, max_pending_faces: int, max_wait_s: float) -> None:
        self.max_pending_faces = max_pending_faces
        self.max_wait_s = max_wait_s
        self.pending_faces = 0  # admitted and not finished
        self._rates: deque[float] = deque(maxlen=RATE_WINDOW)  # faces/s of recent batches
        self.floor_faces_per_s: float | None = None  # one full batch's rate, measured at warm-up
        self.rejected = 0
        self.expired = 0
        self.start_waits: deque[float] = deque(maxlen=1000)  # s from admission to first batch, recent
        self._lock = threading.Lock()

    @property
    def faces_per_s(self) -> float | None:
        """The engine's throughput: the best faces/s of the recent batches, at least the warm-up's
        full-batch rate (None before either)."""
        rates = [*self._rates, self.floor_faces_per_s or 0.0]
        return max(rates) or None

    def predicted_wait_s(self, extra_faces: int = 0) -> float:
        """Seconds until a request queued now would start, at most: every pending face (the
        running batch counted whole) at the measured rate. 0 before a batch was measured."""
        rate = self.faces_per_s
        if not rate:
            return 0.0
        return (self.pending_faces + extra_faces) / rate

    def check_open(self) -> None:
        """Cheap refusal before a request's body is even read: the queue alone already waits
        longer than ``max_wait_s``."""
        wait = self.predicted_wait_s()
        if wait > self.max_wait_s:
            self._refuse(f"about {wait:.2f} s of work is queued on this replica, more than "
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

    def start_batch(self, tickets: list[Ticket]) -> list[bool]:
        """Called as a batch forms: which of its chunks run (``True``) and which are dropped
        because their request waited past ``max_wait_s`` without starting."""
        now = time.monotonic()
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
        return keep

    def finish_batch(self, faces: int, encode_s: float) -> None:
        with self._lock:
            if faces > 0 and encode_s > 0:
                self._rates.append(faces / encode_s)

    def _refuse(self, why: str) -> None:
        self.rejected += 1
        raise RequestError(503, "overloaded", f"replica at capacity: {why}; retry later")

    def expired_error(self, ticket: Ticket) -> RequestError:
        waited = time.monotonic() - ticket.queued_at
        return RequestError(503, "queue_timeout",
                            f"the request waited {waited:.2f} s without reaching the engine, more than "
                            f"max_queue_wait_s ({self.max_wait_s:g} s); retry later")

    def summary(self) -> dict:
        return {
            "pending_faces": self.pending_faces,
            "faces_per_s": self.faces_per_s,
            "warmup_faces_per_s": self.floor_faces_per_s,
            "predicted_wait_s": self.predicted_wait_s(),
            "max_queue_wait_s": self.max_wait_s,
            "max_pending_faces": self.max_pending_faces,
            "rejected_overloaded": self.rejected,
            "dropped_queue_timeout": self.expired,
            "max_start_wait_s": max(self.start_waits) if self.start_waits else None,  # recent requests
        }
