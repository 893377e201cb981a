"""``arcface serve``, ``arcface bench-serve`` and ``arcface bench-overload``: plugged into
``arcface`` as ``arcface.commands`` entry points (pyproject.toml). Nothing here imports Ray
until a command runs."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from engines import Command, EngineError, emit_json, positive_int

if TYPE_CHECKING:
    from .launch import Endpoints
    from .load_bench import GrpcLoad

logger = logging.getLogger(__name__)


def cmd_serve(args: argparse.Namespace) -> int:
    from . import launch

    config = launch.load_serve_config(
        args.config, http_port=args.http_port, grpc_port=args.grpc_port, http_host=args.host,
        grpc=args.grpc,
    )
    endpoints = launch.start(config, address=args.address, include_dashboard=args.dashboard)
    print(f"serving {', '.join(endpoints.applications)}: HTTP {endpoints.http} "
          f"(docs {endpoints.http}/docs), gRPC {endpoints.grpc or 'off'}", flush=True)
    for line in launch.exposure(config, local=args.address is None):
        print(line, flush=True)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        stop.wait(args.exit_after if args.exit_after else None)
    finally:
        print("shutting down", flush=True)
        launch.stop(shutdown_ray=args.address is None)
    return 0


@contextmanager
def _service(args: argparse.Namespace) -> Iterator[Endpoints]:
    """The service to load (``launch.Endpoints``): ``--url`` (and ``--grpc-target``), or a local
    service started from ``--config`` (``--start``, on 127.0.0.1) and stopped when the
    benchmark ends."""
    from .launch import Endpoints

    if not args.start:
        yield Endpoints(http=args.url, grpc=getattr(args, "grpc_target", None) or DEFAULT_GRPC_TARGET,
                        applications=())
        return
    from . import launch

    deployment = None
    if getattr(args, "replicas", None):
        deployment = {"num_replicas": args.replicas, "autoscaling_config": None}
    config = launch.load_serve_config(args.config, http_port=args.http_port, http_host="127.0.0.1",
                                      grpc_port=args.grpc_port, deployment=deployment)
    try:
        yield launch.start(config)
    finally:
        launch.stop()


DEFAULT_GRPC_TARGET = "127.0.0.1:9000"


def _grpc_load(args: argparse.Namespace, endpoints: Endpoints) -> GrpcLoad:
    """``--transport grpc``: the target (``--grpc-target``, else what ``--start`` started) and the
    application metadata (``--application``, else the one ``--start`` deployed)."""
    from .load_bench import GrpcLoad

    target = args.grpc_target or endpoints.grpc
    if target is None:
        raise EngineError("--transport grpc: the started service has no gRPC server "
                          "(grpc_options.grpc_servicer_functions is empty in --config)")
    application = args.application or (endpoints.applications[0] if endpoints.applications else None)
    return GrpcLoad(target=target, application=application, channels=args.grpc_channels,
                    encoding=args.grpc_encoding)


def cmd_bench_serve(args: argparse.Namespace) -> int:
    from .load_bench import format_result, run_load_benchmark

    with _service(args) as endpoints:
        token = args.token or os.environ.get("ARCFACE_SERVE_TOKEN")
        result = run_load_benchmark(
            endpoints.http, args.concurrency, args.faces_per_request, args.duration,
            warmup_s=args.warmup, token=token, inprocess_s=None if args.inprocess else 0,
            body=args.body, accept=args.accept,
            grpc=_grpc_load(args, endpoints) if args.transport == "grpc" else None,
        )
    if args.json:
        emit_json(result.to_dict())
    else:
        print(format_result(result))
    return 1 if result.requests == 0 else 0


def cmd_bench_overload(args: argparse.Namespace) -> int:
    from .overload_bench import OverloadPlan, format_overload, run_overload_benchmark

    with _service(args) as endpoints:
        plan = OverloadPlan(
            url=endpoints.http, faces_per_request=args.faces_per_request, factors=tuple(args.factors),
            duration_s=args.duration, repeat=args.repeat, clients=args.clients,
            capacity_clients=args.capacity_clients, calibrate_s=args.calibrate,
            capacity_rps=args.capacity_rps,
            recovery_timeout_s=args.recovery_timeout,
            token=args.token or os.environ.get("ARCFACE_SERVE_TOKEN"),
        )
        result = run_overload_benchmark(plan)
    if args.json:
        emit_json(result)
    else:
        print(format_overload(result))
    return 0


def _serve_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="Serve deploy config (default config/serve.yaml)")
    p.add_argument("--address", help="connect to this Ray cluster instead of starting one")
    p.add_argument("--host", help="override http_options.host (the config binds 127.0.0.1; 0.0.0.0: every "
                                  "interface, with require_auth)")
    p.add_argument("--no-grpc", dest="grpc", action="store_false",
                   help="no gRPC server (Serve binds gRPC on every interface, whatever --host)")
    p.add_argument("--http-port", type=int, help="override http_options.port")
    p.add_argument("--grpc-port", type=int, help="override grpc_options.port")
    p.add_argument("--dashboard", action="store_true", help="start the Ray dashboard (for serve deploy)")
    p.add_argument("--exit-after", type=float, help="stop after this many seconds (default: Ctrl-C)")


def _target_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", default="http://127.0.0.1:8000", help="service base URL")
    p.add_argument("--start", action="store_true",
                   help="start a local service from --config first, on 127.0.0.1 (and stop it after)")
    p.add_argument("--config", help="Serve deploy config used with --start")
    p.add_argument("--http-port", type=int, help="HTTP port for --start (default from the config)")
    p.add_argument("--grpc-port", type=int, help="gRPC port for --start (default from the config)")
    p.add_argument("--token", help="bearer token (default $ARCFACE_SERVE_TOKEN)")
    p.add_argument("--json", action="store_true")


def _bench_serve_arguments(p: argparse.ArgumentParser) -> None:
    _target_arguments(p)
    p.add_argument("--concurrency", type=positive_int, default=16)
    p.add_argument("--faces-per-request", type=positive_int, default=8)
    p.add_argument("--duration", type=float, default=20.0, help="seconds of measured load")
    p.add_argument("--warmup", type=float, default=3.0, help="seconds of unmeasured load first")
    p.add_argument("--no-inprocess", dest="inprocess", action="store_false",
                   help="skip the in-process engine measurement")
    p.add_argument("--body", choices=("npy", "json"), default="npy",
                   help="request body: the .npy of the crops (default) or JSON base64 crops")
    p.add_argument("--accept", choices=("npy", "base64", "json"), default="npy",
                   help="answer: .npy (default), JSON with base64 float32, or JSON lists of numbers")
    p.add_argument("--transport", choices=("http", "grpc"), default="http",
                   help="http: POST /v1/embed, .npy both ways; grpc: EmbedBatch of raw crops, packed "
                        "answer (/v1/info still read over --url)")
    p.add_argument("--grpc-target", help=f"host:port of the gRPC server (default: what --start started, "
                                         f"else {DEFAULT_GRPC_TARGET})")
    p.add_argument("--application", help="Serve application name sent as gRPC metadata (default: the one "
                                         "--start deployed, else none: a single application)")
    p.add_argument("--grpc-channels", type=positive_int, default=1,
                   help="gRPC channels (HTTP/2 connections) the clients share, round-robin")
    p.add_argument("--grpc-encoding", choices=("packed", "repeated"), default="packed",
                   help="answer encoding asked for (repeated: one message per face, the old path)")


def _factors(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers like 2,5,10, got {text!r}") from None
    if not values or any(not v > 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive load factors like 2,5,10, got {text!r}")
    return values


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text!r}")
    return value


def _bench_overload_arguments(p: argparse.ArgumentParser) -> None:
    _target_arguments(p)
    p.add_argument("--replicas", type=positive_int,
                   help="with --start: this many replicas instead of the config's autoscaling "
                        "(a fixed capacity to measure against)")
    p.add_argument("--faces-per-request", type=positive_int, default=1)
    p.add_argument("--factors", type=_factors, default=[2.0, 5.0, 10.0],
                   help="offered load as multiples of the measured capacity (default 2,5,10)")
    p.add_argument("--duration", type=_positive_float, default=20.0, help="seconds per overload point")
    p.add_argument("--repeat", type=positive_int, default=2, help="runs of each point (the spread)")
    p.add_argument("--clients", type=positive_int, default=1024,
                   help="most requests in flight at once (arrivals beyond are counted, not sent)")
    p.add_argument("--capacity-clients", type=positive_int, default=64,
                   help="closed-loop clients that measure the capacity")
    p.add_argument("--calibrate", type=_positive_float, default=10.0, help="seconds of capacity measurement")
    p.add_argument("--capacity-rps", type=_positive_float,
                   help="skip the capacity phase: this is the capacity (requests/s) the factors multiply")
    p.add_argument("--recovery-timeout", type=_positive_float, default=60.0,
                   help="give up waiting for recovery after this many seconds")


SERVE = Command("serve", "start local Ray + Serve with the embedding service", _serve_arguments, cmd_serve,
                order=60)
BENCH_OVERLOAD = Command(
    "bench-overload",
    "open-loop overload at multiples of the measured capacity: 503 rate, accepted p50/p99, recovery",
    _bench_overload_arguments, cmd_bench_overload, order=71)
BENCH_SERVE = Command("bench-serve", "HTTP or gRPC load test of a running service vs the in-process engine",
                      _bench_serve_arguments, cmd_bench_serve, order=70)
