"""A fair decode queue: many requests' images on a few threads, one image at a time, in turns.

A request with many expensive images must not hold the decode threads until it is done while
a one-image request waits behind it (with two threads, two requests of 256 truncated
6000x6000 JPEGs used to delay an unrelated request by 34 s). Each request is a *job*: its
images are decoded one per turn, and jobs take turns round-robin, so a request's first image
starts after at most one image of every job ahead of it in the ring plus the images already
running (each bounded by ``max_image_megapixels``; a request's total by
``max_request_megapixels``). A job whose first image cannot start within ``max_wait_s``
fails with 503 ``queue_timeout``: the queue is bounded in time, not only in size.

No Ray, no event loop of its own: workers are threads; results come back to the caller's
asyncio loop through a future.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from .errors import RequestError

logger = logging.getLogger(__name__)


@dataclass(eq=False)
class _Job:
    tasks: Sequence[Callable[[], Any]]
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future
    deadline: float
    results: list = field(default_factory=list)
    next: int = 0  # index of the next task to hand out
    done: int = 0
    started: bool = False
    failed: bool = False


class FairDecodeQueue:
    """``await queue.run([fn, fn, ...])`` -> the functions' results, in order (see module doc).

    ``threads``: decode threads (``decode_threads``); ``max_wait_s``: the longest a job may wait
    for its first task to start (``max_queue_wait_s``). ``order`` records ``(job id, task
    index)`` as tasks start, for tests and diagnostics (bounded).
    """

    def __init__(self, threads: int, max_wait_s: float, name: str = "decode") -> None:
        self.max_wait_s = max_wait_s
        self._ring: deque[_Job] = deque()
        self._cv = threading.Condition()
        self._closed = False
        self.order: deque[tuple[int, int]] = deque(maxlen=10_000)
        self.running = 0
        self._workers = [threading.Thread(target=self._work, name=f"{name}-{i}", daemon=True)
                         for i in range(threads)]
        for worker in self._workers:
            worker.start()

    @property
    def waiting_jobs(self) -> int:
        return len(self._ring)

    async def run(self, tasks: Sequence[Callable[[], Any]]) -> list:
        if not tasks:
            return []
        loop = asyncio.get_running_loop()
        job = _Job(tasks, loop, loop.create_future(), time.monotonic() + self.max_wait_s)
        job.results = [None] * len(tasks)
        with self._cv:
            if self._closed:
                raise RuntimeError("decode queue is closed")
            self._ring.append(job)
            self._cv.notify()
        try:
            return await job.future
        except asyncio.CancelledError:  # the client went away: hand out nothing more
            with self._cv:
                job.failed = True
            raise

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify_all()

    def _take(self) -> tuple[_Job, int] | None:
        """The next (job, task index) in turn order; ``None`` once closed. Holds the lock."""
        while True:
            while self._ring and self._ring[0].failed:
                self._ring.popleft()
            if self._ring:
                job = self._ring.popleft()
                if not job.started and time.monotonic() > job.deadline:
                    job.failed = True
                    waited = time.monotonic() - (job.deadline - self.max_wait_s)
                    self._finish(job, RequestError(
                        503, "queue_timeout",
                        f"the request waited {waited:.2f} s for a decode thread, more than max_queue_wait_s "
                        f"({self.max_wait_s:g} s); retry later"))
                    continue
                index = job.next
                job.next += 1
                job.started = True
                if job.next < len(job.tasks):
                    self._ring.append(job)  # its next image waits for the others' turns
                return job, index
            if self._closed:
                return None
            self._cv.wait()

    def _work(self) -> None:
        while True:
            with self._cv:
                taken = self._take()
                if taken is None:
                    return
                job, index = taken
                self.order.append((id(job), index))
                self.running += 1
            try:
                value, error = job.tasks[index](), None
            except BaseException as exc:  # a task's own error ends its job only
                value, error = None, exc
            with self._cv:
                self.running -= 1
                if job.failed:
                    continue
                if error is not None:
                    job.failed = True
                    self._finish(job, error)
                    continue
                job.results[index] = value
                job.done += 1
                if job.done == len(job.tasks):
                    self._finish(job, None)

    @staticmethod
    def _finish(job: _Job, error: BaseException | None) -> None:
        def resolve() -> None:
            if job.future.done():
                return
            if error is None:
                job.future.set_result(job.results)
            else:
                job.future.set_exception(error)

        job.loop.call_soon_threadsafe(resolve)
