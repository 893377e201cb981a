"""``arcface bench-overload``: what a service under overload answers, measured from outside.

One run against one service, in phases:

1. **unloaded**: requests one at a time for ``unloaded_s``: the latency p50/p99 of an idle
   service, the baseline accepted requests under overload are compared with;
2. **capacity**: a closed loop of ``capacity_clients`` clients for ``calibrate_s`` (told 503,
   a client waits ``Retry-After``): the requests/s the service completes when saturated (or
   ``capacity_rps`` as given, to offer the same absolute load to two versions of a service);
3. for each ``factor`` (2, 5, 10 by default), ``repeat`` times: **open-loop** arrivals (Poisson,
   seeded) at ``factor`` x capacity for ``duration_s``. Arrivals do not wait for earlier
   answers, as a population of independent clients does not; at most ``clients`` requests are
   in flight (arrivals beyond are counted as ``client_limited``, never sent). Each answer is
   recorded with its status, latency, and for errors whether it is the service's JSON error
   shape and (503) carries ``Retry-After``;
4. right after each overload point, **recovery**: one probe at a time from the moment the
   arrivals stop; ``recovery_s`` is the time until the first probe answered 200 within
   ``recovered_factor`` x the unloaded p99 (``None`` if not within ``recovery_timeout_s``).

Everything is bounded in time: every loop ends by itself. Only loopback or explicitly given
addresses are contacted; the caller chooses the URL.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from .codec import NPY_MEDIA_TYPE, encode_npy
from .load_bench import _batches

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class OverloadPlan:
    """What to run; every duration in seconds."""

    url: str
    faces_per_request: int = 1
    factors: tuple[float, ...] = (2.0, 5.0, 10.0)
    duration_s: float = 20.0
    repeat: int = 2
    clients: int = 1024
    capacity_clients: int = 64
    calibrate_s: float = 10.0
    capacity_rps: float | None = None  # given: skip the capacity phase (same offered load across runs)
    unloaded_s: float = 3.0
    recovery_timeout_s: float = 60.0
    recovered_factor: float = 2.0
    request_timeout_s: float = 120.0
    settle_s: float = 2.0
    seed: int = 0
    token: str | None = None


@dataclass
class Answer:
    status: str  # HTTP status as text, or the client exception's name
    latency_s: float
    our_shape: bool = True  # errors: body is {"error": {"status", "reason", "message"}}
    retry_after: bool = True  # 503: carries Retry-After
    retry_after_s: float = 1.0  # its value (what a well-behaved client waits)


@dataclass
class PointResult:
    factor: float
    repeat: int
    offered_rps: float
    duration_s: float
    sent: int
    client_limited: int
    statuses: dict[str, int] = field(default_factory=dict)
    rate_503: float = 0.0
    accepted_rps: float = 0.0
    accepted_p50_ms: float | None = None
    accepted_p99_ms: float | None = None
    accepted_p99_vs_unloaded: float | None = None
    rejected_p50_ms: float | None = None
    rejected_p99_ms: float | None = None
    errors_not_our_shape: int = 0
    rejections_without_retry_after: int = 0
    recovery_s: float | None = None


def _percentile_ms(latencies: list[float], q: float) -> float | None:
    return float(np.percentile(np.asarray(latencies) * 1e3, q)) if latencies else None


class _Client:
    """One aiohttp session and the request every phase sends."""

    def __init__(self, plan: OverloadPlan, session) -> None:
        self.plan = plan
        self.session = session
        self.url = plan.url.rstrip("/") + "/v1/embed"
        self.bodies = [encode_npy(b) for b in _batches(plan.faces_per_request)]
        self.headers = {"content-type": NPY_MEDIA_TYPE, "accept": NPY_MEDIA_TYPE}
        if plan.token:
            self.headers["authorization"] = f"Bearer {plan.token}"
        self._next = 0

    async def send(self) -> Answer:
        import aiohttp

        body = self.bodies[self._next % len(self.bodies)]
        self._next += 1
        started = time.perf_counter()
        try:
            async with self.session.post(self.url, data=body, headers=self.headers) as resp:
                payload = await resp.read()
                latency = time.perf_counter() - started
                answer = Answer(str(resp.status), latency)
                if resp.status != 200:
                    answer.our_shape = _is_error_shape(payload, resp.headers.get("content-type", ""))
                    answer.retry_after = resp.status != 503 or "retry-after" in resp.headers
                    value = resp.headers.get("retry-after", "")
                    answer.retry_after_s = float(value) if value.isdigit() else 1.0
                return answer
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            return Answer(type(exc).__name__, time.perf_counter() - started, our_shape=False)


def _is_error_shape(payload: bytes, content_type: str) -> bool:
    import json

    if not content_type.startswith("application/json"):
        return False
    try:
        error = json.loads(payload)["error"]
        return {"status", "reason", "message"} <= set(error)
    except (ValueError, KeyError, TypeError):
        return False


async def _sequential(client: _Client, seconds: float) -> list[Answer]:
    answers, end = [], time.perf_counter() + seconds
    while time.perf_counter() < end:
        answers.append(await client.send())
    return answers


async def _closed_loop(client: _Client, clients: int, seconds: float) -> tuple[list[Answer], float]:
    """Clients that send back to back and, told 503, wait ``Retry-After`` (capped by the end),
    as a well-behaved client does: a saturated service, not a storm of refusals."""
    answers: list[Answer] = []
    started = time.perf_counter()
    end = started + seconds

    async def worker() -> None:
        while time.perf_counter() < end:
            answer = await client.send()
            answers.append(answer)
            if answer.status == "503":
                await asyncio.sleep(max(0.0, min(answer.retry_after_s, end - time.perf_counter())))

    await asyncio.gather(*(worker() for _ in range(clients)))
    return answers, time.perf_counter() - started


async def _open_loop(client: _Client, rate: float, seconds: float, max_in_flight: int,
                     rng: random.Random) -> tuple[list[Answer], int, float, list[asyncio.Task]]:
    """Poisson arrivals at ``rate``/s for ``seconds``; returns the answers so far, the arrivals
    refused at the client limit, the time the arrivals stopped and the requests still in flight."""
    answers: list[Answer] = []
    in_flight: set[asyncio.Task] = set()
    limited = 0

    async def one() -> None:
        answers.append(await client.send())

    started = time.perf_counter()
    end, due = started + seconds, started
    while True:
        due += rng.expovariate(rate)
        if due >= end:
            break
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        if len(in_flight) >= max_in_flight:
            limited += 1
            continue
        task = asyncio.create_task(one())
        in_flight.add(task)
        task.add_done_callback(in_flight.discard)
    await asyncio.sleep(max(0.0, end - time.perf_counter()))
    return answers, limited, time.perf_counter(), list(in_flight)


async def _recovery(client: _Client, since: float, threshold_s: float, timeout_s: float) -> float | None:
    """Seconds from ``since`` until a probe answers 200 within ``threshold_s``."""
    while time.perf_counter() - since < timeout_s:
        answer = await client.send()
        if answer.status == "200" and answer.latency_s <= threshold_s:
            return time.perf_counter() - since
        await asyncio.sleep(0.05)
    return None


def _point(factor: float, repeat: int, rate: float, seconds: float, answers: list[Answer],
           limited: int, unloaded_p99_ms: float | None, recovery_s: float | None) -> PointResult:
    statuses: dict[str, int] = {}
    for a in answers:
        statuses[a.status] = statuses.get(a.status, 0) + 1
    ok = [a.latency_s for a in answers if a.status == "200"]
    rejected = [a.latency_s for a in answers if a.status == "503"]
    result = PointResult(
        factor=factor, repeat=repeat, offered_rps=rate, duration_s=seconds, sent=len(answers),
        client_limited=limited, statuses=dict(sorted(statuses.items())),
        rate_503=len(rejected) / len(answers) if answers else 0.0,
        accepted_rps=len(ok) / seconds,
        accepted_p50_ms=_percentile_ms(ok, 50), accepted_p99_ms=_percentile_ms(ok, 99),
        rejected_p50_ms=_percentile_ms(rejected, 50), rejected_p99_ms=_percentile_ms(rejected, 99),
        errors_not_our_shape=sum(1 for a in answers if a.status != "200" and not a.our_shape),
        rejections_without_retry_after=sum(1 for a in answers if a.status == "503" and not a.retry_after),
        recovery_s=recovery_s,
    )
    if result.accepted_p99_ms is not None and unloaded_p99_ms:
        result.accepted_p99_vs_unloaded = result.accepted_p99_ms / unloaded_p99_ms
    return result


async def _run(plan: OverloadPlan) -> dict[str, Any]:
    import aiohttp
    from tqdm import tqdm

    timeout = aiohttp.ClientTimeout(total=plan.request_timeout_s)
    connector = aiohttp.TCPConnector(limit=plan.clients + 8)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        client = _Client(plan, session)
        await _sequential(client, 1.0)  # warm-up: first batches, connections
        idle = [a for a in await _sequential(client, plan.unloaded_s) if a.status == "200"]
        if not idle:
            raise RuntimeError(f"{client.url}: no request succeeded on the idle service")
        unloaded = {"requests": len(idle), "p50_ms": _percentile_ms([a.latency_s for a in idle], 50),
                    "p99_ms": _percentile_ms([a.latency_s for a in idle], 99)}
        if plan.capacity_rps:
            capacity_rps, answers, elapsed, ok = plan.capacity_rps, [], 0.0, []
        else:
            answers, elapsed = await _closed_loop(client, plan.capacity_clients, plan.calibrate_s)
            ok = [a.latency_s for a in answers if a.status == "200"]
            capacity_rps = len(ok) / elapsed
            if capacity_rps <= 0:
                raise RuntimeError(f"{client.url}: no request succeeded in the capacity phase")
        capacity = {
            "given": bool(plan.capacity_rps), "clients": plan.capacity_clients, "seconds": elapsed,
            "requests_per_s": capacity_rps, "faces_per_s": capacity_rps * plan.faces_per_request,
            "p50_ms": _percentile_ms(ok, 50), "p99_ms": _percentile_ms(ok, 99),
            "statuses": _count(answers),
        }
        logger.info("unloaded p99 %.1f ms, capacity %.1f requests/s", unloaded["p99_ms"], capacity_rps)
        rng = random.Random(plan.seed)
        threshold_s = plan.recovered_factor * unloaded["p99_ms"] / 1e3
        points = []
        schedule = [(repeat, factor) for repeat in range(plan.repeat) for factor in plan.factors]
        for repeat, factor in tqdm(schedule, desc="overload points", unit="point"):
            await asyncio.sleep(plan.settle_s)
            rate = factor * capacity_rps
            answers, limited, stopped, pending = await _open_loop(
                client, rate, plan.duration_s, plan.clients, rng)
            recovery_s = await _recovery(client, stopped, threshold_s, plan.recovery_timeout_s)
            if pending:  # bounded: each request has the client timeout
                await asyncio.wait(pending, timeout=plan.request_timeout_s + 5)
            point = _point(factor, repeat, rate, plan.duration_s, answers, limited,
                           unloaded["p99_ms"], recovery_s)
            logger.info("x%g #%d: %s", factor, repeat, point)
            points.append(point)
    return {"unloaded": unloaded, "capacity": capacity, "points": points}


def _count(answers: list[Answer]) -> dict[str, int]:
    out: dict[str, int] = {}
    for a in answers:
        out[a.status] = out.get(a.status, 0) + 1
    return dict(sorted(out.items()))


SUMMARY_KEYS = ("rate_503", "accepted_rps", "accepted_p50_ms", "accepted_p99_ms",
                "accepted_p99_vs_unloaded", "rejected_p99_ms", "errors_not_our_shape",
                "rejections_without_retry_after", "recovery_s")


def summarize(points: list[PointResult]) -> dict[str, dict[str, dict[str, float | None]]]:
    """Per factor, each metric's min / median / max over the repeats (``None`` values, such as a
    recovery that never came, are reported as ``not_recovered`` counts, not folded in)."""
    out: dict[str, dict[str, dict[str, float | None]]] = {}
    for factor in sorted({p.factor for p in points}):
        group = [p for p in points if p.factor == factor]
        metrics: dict[str, dict[str, float | None]] = {}
        for key in SUMMARY_KEYS:
            values = [getattr(p, key) for p in group]
            known = [v for v in values if v is not None]
            metrics[key] = {
                "min": min(known) if known else None,
                "median": float(np.median(known)) if known else None,
                "max": max(known) if known else None,
                "missing": len(values) - len(known),
            }
        out[f"x{factor:g}"] = metrics
    return out


def run_overload_benchmark(plan: OverloadPlan) -> dict[str, Any]:
    """Run every phase of ``plan``; a JSON-ready dict (see the module docstring)."""
    import requests

    from engines import cpu_model_name

    raw = asyncio.run(_run(plan))
    headers = {"authorization": f"Bearer {plan.token}"} if plan.token else {}
    try:
        info = requests.get(plan.url.rstrip("/") + "/v1/info", headers=headers, timeout=30).json()
    except (requests.RequestException, ValueError):
        info = {}
    service = info.get("service", {})
    return {
        "url": plan.url,
        "cpu": cpu_model_name(),
        "plan": {k: v for k, v in asdict(plan).items() if k != "token"},
        "engine": {k: info.get(k) for k in ("backend", "model_id", "precision", "device")},
        "service": {k: service.get(k) for k in sorted(service) if k not in ("replica", "pid")},
        "unloaded": raw["unloaded"],
        "capacity": raw["capacity"],
        "points": [asdict(p) for p in raw["points"]],
        "summary": summarize(raw["points"]),
    }


def format_overload(result: dict[str, Any]) -> str:
    u, c = result["unloaded"], result["capacity"]
    lines = [
        f"{result['url']} on {result['cpu']}: {result['plan']['faces_per_request']} face(s)/request, "
        f"engine {result['engine'].get('backend')}/{result['engine'].get('precision')}",
        f"  unloaded  p50 {u['p50_ms']:.1f} ms, p99 {u['p99_ms']:.1f} ms ({u['requests']} requests)",
        f"  capacity  {c['requests_per_s']:.1f} requests/s ({c['faces_per_s']:.1f} faces/s) "
        + ("(given)" if c["given"]
           else f"with {c['clients']} clients, p99 {c['p99_ms'] or float('nan'):.1f} ms"),
        "  factor  503-rate  accepted/s  p50 ms  p99 ms  p99/unloaded  503 p99 ms  bad-shape  recovery s",
    ]
    for p in result["points"]:
        lines.append(
            f"  x{p['factor']:<5g} {p['rate_503']:8.2f}  {p['accepted_rps']:10.1f}  "
            f"{_fmt(p['accepted_p50_ms']):>6}  {_fmt(p['accepted_p99_ms']):>6}  "
            f"{_fmt(p['accepted_p99_vs_unloaded'], 2):>12}  {_fmt(p['rejected_p99_ms']):>10}  "
            f"{p['errors_not_our_shape'] + p['rejections_without_retry_after']:>9}  "
            f"{_fmt(p['recovery_s'], 2):>10}   {p['statuses']}"
        )
    return "\n".join(lines)


def _fmt(value: float | None, digits: int = 0) -> str:
    return "-" if value is None else f"{value:.{digits}f}"
