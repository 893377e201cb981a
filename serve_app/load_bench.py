"""``arcface bench-serve``: an async load generator against a running service, over HTTP
(``.npy`` both ways) or gRPC (``EmbedBatch`` of raw crops, packed answer).

It reports what a client sees (faces/s, request latency percentiles, errors),
what the service did (mean faces per engine batch, from ``/v1/info`` before
and after), and the ratio of the service's throughput to the same engine
called in-process, measured in the same run right after the load phase (never
concurrently: on a small machine they would compete for the same cores).
Either transport reads ``/v1/info`` over HTTP (batch statistics, the engine to compare with).

gRPC load runs on ``grpc.aio`` in the same event loop as the workers: ``channels`` channels
(default 1), worker ``i`` on channel ``i % channels``. One channel is one HTTP/2 connection
multiplexing every worker's calls, as a real client process would hold; more channels spread
the calls over more connections to the proxy (each channel costs the load generator, not the
shell). The requests are built once, before the measured span.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from engines import CpuSampler, ProcessCpu, cpu_summary, ratio_parts, ratio_summary

from .client import (
    GRPC_CHANNEL_OPTIONS,
    AsyncEmbeddingClient,
    RetryPolicy,
    ServiceError,
    decode_embed_response,
    grpc_metadata,
)
from .errors import DEFAULT_RETRY_AFTER_S, RETRYABLE_STATUSES

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class GrpcLoad:
    """Where and how the gRPC load goes: ``target`` (host:port), the Serve ``application`` name
    (metadata; ``None`` when one application runs), ``channels`` shared by the workers,
    ``encoding`` of the answers asked for (``packed``; ``repeated`` to measure the old path)."""

    target: str
    application: str | None = None
    channels: int = 1
    encoding: str = "packed"


@dataclass
class LoadResult:
    url: str
    transport: str  # http (body and accept below) or grpc (EmbedBatch, raw crops)
    concurrency: int
    faces_per_request: int
    duration_s: float
    requests: int
    faces: int
    body: str = "npy"  # request body: npy (the .npy of the crops) or json (base64 crops)
    accept: str = "npy"  # answer: npy, base64 (JSON, float32 bytes) or json (lists of numbers)
    errors: dict[str, int] = field(default_factory=dict)
    throughput_fps: float = 0.0
    requests_per_s: float = 0.0
    latency_ms_p50: float = float("nan")
    latency_ms_p95: float = float("nan")
    latency_ms_p99: float = float("nan")
    observed_mean_batch_faces: float | None = None
    inprocess_fps: float | None = None
    inprocess_batch_size: int | None = None
    ratio_to_inprocess: float | None = None
    engine: dict[str, Any] = field(default_factory=dict)
    # CPU of the service's processes during the measured load, by role (engines.bench.cpu_cost):
    # proxy, replica (engine included), serve_controller, ray_system, ...; with --start only
    shell_cpu: dict[str, Any] | None = None
    # this process's CPU during the load (the load generator, on the same cores as the service)
    client_cpu: dict[str, Any] | None = None
    # the ratio's two factors (engines.bench.ratio): the engine's share of the CPU the service
    # and the load generator spent per face, and the cores they kept busy against in-process
    ratio_parts: dict[str, Any] | None = None
    grpc: dict[str, Any] | None = None  # GrpcLoad's fields with transport grpc

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _batches(faces_per_request: int, count: int = 16) -> list[np.ndarray]:
    from engines import jittered_faces

    pool = jittered_faces(max(faces_per_request * count, 7), seed=4242).faces
    rng = np.random.default_rng(0)
    return [pool[rng.choice(len(pool), faces_per_request, replace=False)] for _ in range(count)]


Outcome = tuple[int | str, float | None]  # status (200, a code or its name), the Retry-After it gave


class _HttpSender:
    """One embed over HTTP through ``AsyncEmbeddingClient``: 200, or the refusal's status and
    the ``Retry-After`` it came with."""

    def __init__(self, client: AsyncEmbeddingClient, batches: list[np.ndarray]) -> None:
        self.client, self.batches = client, batches

    async def __call__(self, worker: int, k: int) -> Outcome:
        try:
            await self.client.embed(self.batches[k])
            return 200, None
        except ServiceError as exc:
            return exc.status or exc.reason, exc.retry_after_s

    async def close(self) -> None:
        return None


class _GrpcSender:
    """One ``EmbedBatch`` over ``grpc.aio``: 200 once the answer decodes to the faces sent, or the
    status code's name (``UNAVAILABLE``, ...). Channels are made in the running loop."""

    def __init__(self, load: GrpcLoad, token: str | None, batches: list[np.ndarray]) -> None:
        import grpc

        from .protos import embedding_pb2 as pb
        from .protos import embedding_pb2_grpc as pb_grpc

        if load.encoding not in ("packed", "repeated"):
            raise ValueError(f"gRPC answer encoding must be packed or repeated, got {load.encoding!r}")
        self.encoding = pb.PACKED if load.encoding == "packed" else pb.REPEATED
        self.channels = [grpc.aio.insecure_channel(load.target, options=GRPC_CHANNEL_OPTIONS)
                         for _ in range(load.channels)]
        self.stubs = [pb_grpc.EmbeddingServiceStub(c) for c in self.channels]
        self.metadata = grpc_metadata(load.application, token)
        self.error = grpc.aio.AioRpcError
        self.requests = [(pb.EmbedBatchRequest(crops=b.tobytes(), encoding=self.encoding), len(b))
                         for b in batches]

    async def __call__(self, worker: int, k: int) -> Outcome:
        request, faces = self.requests[k]
        try:
            reply = await self.stubs[worker % len(self.stubs)].EmbedBatch(request, metadata=self.metadata,
                                                                           timeout=120)
        except self.error as exc:
            return exc.code().name, None  # gRPC refusals carry no Retry-After
        decode_embed_response(reply, faces)  # raises on an answer that does not add up
        return 200, None

    async def close(self) -> None:
        for channel in self.channels:
            await channel.close()


async def _load(url: str, concurrency: int, faces_per_request: int, duration_s: float,
                warmup_s: float, token: str | None, body: str = "npy", accept: str = "npy",
                grpc: GrpcLoad | None = None) -> tuple[LoadResult, dict, dict]:
    """Closed-loop load: HTTP through ``client.AsyncEmbeddingClient`` (``body`` and ``accept``
    as its ``transport`` and ``accept``), or gRPC ``EmbedBatch`` (``grpc``); no retries: a
    refusal is counted, by status, as the service's answer, and its worker then waits what the
    refusal asks when it is a retryable one (503 or ``UNAVAILABLE``: its ``Retry-After``, else
    the service's default), as a well-behaved client does. Sending again at once would measure
    a loop of refusals spending the proxy's CPU, not what the service sustains. ``/v1/info``
    over HTTP either way."""
    batches = _batches(faces_per_request)
    latencies: list[float] = []
    errors: dict[str, int] = {}
    done_faces = 0
    client = AsyncEmbeddingClient(url, token=token, transport=body, accept=accept,
                                  retry=RetryPolicy(retries=0), connections=concurrency, timeout_s=120)
    send = _HttpSender(client, batches) if grpc is None else _GrpcSender(grpc, token, batches)
    async with client:

        async def worker(i: int, until: float, record: bool) -> None:
            nonlocal done_faces
            k = i
            while time.perf_counter() < until:
                started = time.perf_counter()
                status, retry_after_s = await send(i, k % len(batches))
                k += 1
                if record and status == 200:
                    latencies.append(time.perf_counter() - started)
                    done_faces += faces_per_request
                elif record:
                    errors[str(status)] = errors.get(str(status), 0) + 1
                if status in RETRYABLE_STATUSES or status == "UNAVAILABLE":
                    wait_s = retry_after_s or DEFAULT_RETRY_AFTER_S
                    await asyncio.sleep(max(0.0, min(wait_s, until - time.perf_counter())))

        try:
            before = await client.info()  # also the client's request limit and contract
            if warmup_s > 0:
                end = time.perf_counter() + warmup_s
                await asyncio.gather(*(worker(i, end, False) for i in range(concurrency)))
                before = await client.info()
            # the service's processes (a --start cluster is this process's tree), not this load generator
            sampler = CpuSampler(exclude_self=True).start()
            with ProcessCpu() as client_cpu:  # this process: the load generator (and sampler)
                started = time.perf_counter()
                end = started + duration_s
                await asyncio.gather(*(worker(i, end, True) for i in range(concurrency)))
                elapsed = time.perf_counter() - started
            cost = sampler.stop()
            after = await client.info()
        finally:
            await send.close()
    lat = np.asarray(latencies) * 1e3
    client_cpu.faces = done_faces
    result = LoadResult(
        url=url,
        transport="http" if grpc is None else "grpc",
        grpc=None if grpc is None else asdict(grpc),
        concurrency=concurrency,
        faces_per_request=faces_per_request,
        duration_s=elapsed,
        body=body,
        accept=accept,
        requests=len(latencies),
        faces=done_faces,
        errors=errors,
        throughput_fps=done_faces / elapsed,
        requests_per_s=len(latencies) / elapsed,
        # nothing seen: the service runs outside this process's tree (--url without --start)
        shell_cpu=cost.per_face(done_faces) if cost.cpu_s > 0 else None,
        client_cpu={"cpu_ms_per_face": client_cpu.cpu_ms_per_face, "cores_busy": client_cpu.cores_busy},
    )
    if lat.size:
        result.latency_ms_p50, result.latency_ms_p95, result.latency_ms_p99 = (
            float(np.percentile(lat, q)) for q in (50, 95, 99)
        )
    return result, before, after


def inprocess_throughput(info: dict[str, Any], batch_size: int, seconds: float) -> tuple[float, ProcessCpu]:
    """The same engine (backend, model, precision) in this process, at ``batch_size``: faces/s,
    and the CPU it spent (its thread pool included) per face."""
    from engines import get_engine, jittered_faces

    engine = get_engine(
        info["backend"], info["model_ref"], precision=info["precision"], device=info["device"],
        batch_size=batch_size, max_batch_size=max(batch_size, info.get("max_batch_size", batch_size)),
    )
    faces = jittered_faces(batch_size, seed=99).faces
    engine.encode(faces)  # warm-up
    with ProcessCpu() as cpu:
        started = time.perf_counter()
        while time.perf_counter() - started < seconds:
            engine.encode(faces)
            cpu.faces += batch_size
    engine.close()
    return cpu.faces_per_s, cpu


def run_load_benchmark(url: str, concurrency: int, faces_per_request: int, duration_s: float,
                       warmup_s: float = 3.0, token: str | None = None,
                       inprocess_s: float | None = None, body: str = "npy", accept: str = "npy",
                       grpc: GrpcLoad | None = None) -> LoadResult:
    """The load phase (HTTP at ``url`` with ``body`` / ``accept``, or gRPC per ``grpc``), then
    the in-process engine (``inprocess_s`` seconds, default ``min(duration_s, 10)``; 0: skipped)."""
    result, before, after = asyncio.run(
        _load(url, concurrency, faces_per_request, duration_s, warmup_s, token, body, accept, grpc)
    )
    b0, b1 = before.get("batch_stats", {}), after.get("batch_stats", {})
    batches = b1.get("batches", 0) - b0.get("batches", 0)
    if batches > 0:
        result.observed_mean_batch_faces = (b1.get("faces", 0) - b0.get("faces", 0)) / batches
    service = after.get("service", {})
    result.engine = {k: after.get(k) for k in ("backend", "model_id", "precision", "device", "contract")}
    result.engine["max_batch_size"] = service.get("max_batch_size")
    if inprocess_s != 0:
        batch = int(service.get("max_batch_size") or 32)
        result.inprocess_batch_size = batch
        seconds = inprocess_s or min(duration_s, 10.0)
        result.inprocess_fps, engine_cpu = inprocess_throughput(after, batch, seconds)
        result.ratio_to_inprocess = result.throughput_fps / result.inprocess_fps
        result.ratio_parts = _ratio_parts(result, engine_cpu)
    return result


def _ratio_parts(r: LoadResult, engine_cpu: ProcessCpu) -> dict[str, Any] | None:
    """The service's and the load generator's CPU per face together (both on this machine's
    cores), against the engine's in-process; None where the service was not seen (no --start)."""
    shell, client = r.shell_cpu or {}, r.client_cpu or {}
    if not shell.get("cpu_ms_per_face") or not client.get("cpu_ms_per_face"):
        return None
    return ratio_parts(engine_cpu, shell["cpu_ms_per_face"] + client["cpu_ms_per_face"],
                       shell["cores_busy"] + client["cores_busy"])


def format_result(r: LoadResult) -> str:
    where = r.url if r.grpc is None else (f"grpc {r.grpc['target']} ({r.grpc['channels']} channel(s), "
                                          f"{r.grpc['encoding']} answers)")
    lines = [
        f"{where}: {r.concurrency} clients x {r.faces_per_request} faces/request, {r.duration_s:.1f} s"
        + ("" if r.transport == "grpc" else f" ({r.body} body, {r.accept} answer)"),
        f"  engine      {r.engine.get('backend')} / {r.engine.get('precision')} / {r.engine.get('model_id')}",
        f"  throughput  {r.throughput_fps:.1f} faces/s ({r.requests_per_s:.1f} requests/s), "
        f"errors {r.errors}",
        f"  latency     p50 {r.latency_ms_p50:.1f} ms, p95 {r.latency_ms_p95:.1f} ms, "
        f"p99 {r.latency_ms_p99:.1f} ms",
        f"  batches     mean {r.observed_mean_batch_faces or float('nan'):.1f} faces per engine batch",
    ]
    if r.shell_cpu:
        lines.append(f"  cpu         {cpu_summary(r.shell_cpu)}")
    if r.inprocess_fps:
        lines.append(
            f"  in-process  {r.inprocess_fps:.1f} faces/s at batch {r.inprocess_batch_size}; "
            f"service / in-process = {r.ratio_to_inprocess:.2f}"
        )
    if r.ratio_parts:
        lines.append(f"  why         {ratio_summary(r.ratio_parts)} (service and load generator)")
    return "\n".join(lines)
