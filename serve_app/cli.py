"""``arcface serve`` and ``arcface bench-serve``: plugged into ``arcface`` as ``arcface.commands``
entry points (pyproject.toml). Nothing here imports Ray until a command runs."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import threading

from engines import Command, emit_json, positive_int

logger = logging.getLogger(__name__)


def cmd_serve(args: argparse.Namespace) -> int:
    from . import launch

    config = launch.load_serve_config(
        args.config, http_port=args.http_port, grpc_port=args.grpc_port, http_host=args.host
    )
    endpoints = launch.start(config, address=args.address, include_dashboard=args.dashboard)
    print(f"serving {', '.join(endpoints.applications)}: HTTP {endpoints.http} "
          f"(docs {endpoints.http}/docs), gRPC {endpoints.grpc or 'off'}", flush=True)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        stop.wait(args.exit_after if args.exit_after else None)
    finally:
        print("shutting down", flush=True)
        launch.stop(shutdown_ray=args.address is None)
    return 0


def cmd_bench_serve(args: argparse.Namespace) -> int:
    from . import launch
    from .load_bench import format_result, run_load_benchmark

    url = args.url
    started_here = False
    if args.start:
        config = launch.load_serve_config(args.config, http_port=args.http_port, http_host="127.0.0.1")
        url = launch.start(config).http
        started_here = True
    try:
        token = args.token or os.environ.get("ARCFACE_SERVE_TOKEN")
        result = run_load_benchmark(
            url, args.concurrency, args.faces_per_request, args.duration,
            warmup_s=args.warmup, token=token, inprocess_s=None if args.inprocess else 0,
        )
    finally:
        if started_here:
            launch.stop()
    if args.json:
        emit_json(result.to_dict())
    else:
        print(format_result(result))
    return 1 if result.requests == 0 else 0


def _serve_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="Serve deploy config (default config/serve.yaml)")
    p.add_argument("--address", help="connect to this Ray cluster instead of starting one")
    p.add_argument("--host", help="override http_options.host")
    p.add_argument("--http-port", type=int, help="override http_options.port")
    p.add_argument("--grpc-port", type=int, help="override grpc_options.port")
    p.add_argument("--dashboard", action="store_true", help="start the Ray dashboard (for serve deploy)")
    p.add_argument("--exit-after", type=float, help="stop after this many seconds (default: Ctrl-C)")


def _bench_serve_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", default="http://127.0.0.1:8000", help="service base URL")
    p.add_argument("--start", action="store_true",
                   help="start a local service from --config first (and stop it after)")
    p.add_argument("--config", help="Serve deploy config used with --start")
    p.add_argument("--http-port", type=int, help="port for --start (default from the config)")
    p.add_argument("--concurrency", type=positive_int, default=16)
    p.add_argument("--faces-per-request", type=positive_int, default=8)
    p.add_argument("--duration", type=float, default=20.0, help="seconds of measured load")
    p.add_argument("--warmup", type=float, default=3.0, help="seconds of unmeasured load first")
    p.add_argument("--token", help="bearer token (default $ARCFACE_SERVE_TOKEN)")
    p.add_argument("--no-inprocess", dest="inprocess", action="store_false",
                   help="skip the in-process engine measurement")
    p.add_argument("--json", action="store_true")


SERVE = Command("serve", "start local Ray + Serve with the embedding service", _serve_arguments, cmd_serve,
                order=60)
BENCH_SERVE = Command("bench-serve", "HTTP load test of a running service vs the in-process engine",
                      _bench_serve_arguments, cmd_bench_serve, order=70)
