"""Adaptive load shedding in the proxy (no Ray in here): refuse most of an overload before it
costs a replica anything.

A replica refuses what it cannot start within ``max_queue_wait_s`` (``admission``), but each
refusal still crosses Serve's proxy, router and an actor call, and on a small host 10x the
capacity in refusals takes the CPU the engine needs (accepted requests then slow down too).
So the proxy sheds first, with the client-side throttling of Google's SRE book ("Handling
Overload"): per route it counts, over the last ``window_s`` seconds, the requests it saw and
those the replicas *accepted* (answered with anything but 503/429), and refuses a new
request itself with probability ``max(0, (requests - k * accepts) / (requests + 1))``.
A request the proxy lets through is counted when its answer comes, not when it arrives:
counted on arrival, a burst of slow but accepted requests (a busy CPU replica takes seconds)
would look like refusals until their answers came, and the burst would be shed.
With ``k`` = 2 the replicas see at most about twice what they accept: their own admission
keeps deciding exactly, the proxy only drops the excess beyond that, and as soon as the
replicas accept again the probability falls to 0 within one window.

Only POSTs are shed, and only on routes that have answered 200 before (an attacker's random
paths are never tracked, so they cannot push real routes out of the table).
"""

from __future__ import annotations

import os
import random
import time
from collections import OrderedDict, deque
from collections.abc import Callable

DEFAULT_K = 2.0
DEFAULT_WINDOW_S = 4.0
_BUCKETS = 8
_MAX_ROUTES = 64


class _Counts:
    """Requests and accepts of one route in time buckets covering the window."""

    def __init__(self, window_s: float) -> None:
        self.window_s = window_s
        self.bucket_s = window_s / _BUCKETS
        self._buckets: deque[list[float]] = deque()  # [start, requests, accepts]

    def _bucket(self, now: float) -> list[float]:
        while self._buckets and self._buckets[0][0] <= now - self.window_s:
            self._buckets.popleft()
        if not self._buckets or self._buckets[-1][0] + self.bucket_s <= now:
            self._buckets.append([now, 0.0, 0.0])
        return self._buckets[-1]

    def add(self, now: float, requests: int = 0, accepts: int = 0) -> None:
        bucket = self._bucket(now)
        bucket[1] += requests
        bucket[2] += accepts

    def totals(self, now: float) -> tuple[float, float]:
        self._bucket(now)
        return sum(b[1] for b in self._buckets), sum(b[2] for b in self._buckets)


class AdaptiveThrottle:
    """See the module docstring. ``k`` <= 0 disables shedding; ``rand`` and the ``now``
    arguments are injectable for tests."""

    def __init__(self, k: float = DEFAULT_K, window_s: float = DEFAULT_WINDOW_S,
                 rand: Callable[[], float] = random.random) -> None:
        self.k = k
        self.window_s = window_s
        self._rand = rand
        self._routes: OrderedDict[str, _Counts] = OrderedDict()

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> AdaptiveThrottle:
        """``ARCFACE_PROXY_SHED_K`` (2; 0 turns shedding off) and ``ARCFACE_PROXY_SHED_WINDOW_S``
        (4), from the proxy's environment (``controller_options`` in ``config/serve.yaml``)."""
        env = os.environ if environ is None else environ
        return cls(float(env.get("ARCFACE_PROXY_SHED_K", DEFAULT_K)),
                   float(env.get("ARCFACE_PROXY_SHED_WINDOW_S", DEFAULT_WINDOW_S)))

    @property
    def enabled(self) -> bool:
        return self.k > 0 and self.window_s > 0

    def shed_probability(self, route: str, now: float | None = None) -> float:
        counts = self._routes.get(route)
        if counts is None:
            return 0.0
        requests, accepts = counts.totals(time.monotonic() if now is None else now)
        return max(0.0, (requests - self.k * accepts) / (requests + 1))

    def admit(self, route: str, now: float | None = None) -> bool:
        """Count a request to ``route``; ``False``: refuse it here."""
        now = time.monotonic() if now is None else now
        counts = self._routes.get(route)
        if counts is None:
            return True
        p = self.shed_probability(route, now)
        self._routes.move_to_end(route)
        if p > 0 and self._rand() < p:
            counts.add(now, requests=1)  # answered here and now: a request not accepted
            return False
        return True  # counted by ``record`` when its answer comes

    def record(self, route: str, status: int, now: float | None = None) -> None:
        """What a replica (or Serve) answered a request the proxy let through: one request,
        accepted unless 429/503."""
        now = time.monotonic() if now is None else now
        counts = self._routes.get(route)
        if counts is None:
            if status != 200:
                return
            counts = self._routes[route] = _Counts(self.window_s)
            while len(self._routes) > _MAX_ROUTES:
                self._routes.popitem(last=False)
        counts.add(now, requests=1, accepts=int(status not in (429, 503)))
