"""Small helpers shared by test modules (importable: pytest puts tests/helpers/ on sys.path)."""

from __future__ import annotations

import contextlib
import io
import socket
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass(frozen=True)
class CliResult:
    """What a command line returned and printed, as ``subprocess.CompletedProcess`` names it."""

    returncode: int
    stdout: str
    stderr: str


def run_main(main: Callable[[Sequence[str]], int], argv: Sequence[str]) -> CliResult:
    """Run a command's ``main(argv)`` in this process, as its console script would (argparse's
    ``SystemExit`` is the exit code). For refusals that happen before any work: a subprocess
    per case costs seconds of imports and proves nothing more; each command keeps at least one
    real-subprocess test of its exit code."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(list(argv))
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else 1
    return CliResult(code, out.getvalue(), err.getvalue())


# Settings of the session's local Ray (the ``ray_local`` fixture), kept so that a test
# module that needs another cluster in this process can put it back afterwards.
_LOCAL_RAY: dict = {}


def init_local_ray(metrics_port: int) -> None:
    """The session's local Ray: 2 CPUs, no dashboard, small object store, metrics every second."""
    import ray

    from data_jobs.settings import load_job_settings, local_ray_system_config

    ray.init(
        num_cpus=2,
        include_dashboard=False,
        object_store_memory=200 << 20,
        namespace="arcface-tests",
        _metrics_export_port=metrics_port,
        # the job's local worker pool too (data_jobs.settings.local_ray_system_config): tasks'
        # workers kept instead of restarted, as a job that starts its own Ray has them
        _system_config={"metrics_report_interval_ms": 1000,
                        **local_ray_system_config(load_job_settings())},
        log_to_driver=False,
    )
    _LOCAL_RAY["metrics_port"] = metrics_port


@contextmanager
def ray_connection_suspended(restore: bool = True):
    """Leave this process's Ray (and Serve) for a while, e.g. to drive another cluster.

    A driver holds one connection, so a test on another cluster must first shut the
    session's local Ray down; afterwards, with ``restore``, it is started again with the same
    settings, so ``ray_local`` holds for any test that runs later. (Serve state on the local Ray
    is not restored: ``tests/conftest.py`` orders the tests that use another cluster last.)
    """
    import ray

    was_local = ray.is_initialized() and bool(_LOCAL_RAY)
    if ray.is_initialized():
        from ray import serve

        serve.shutdown()
        ray.shutdown()
    try:
        yield
    finally:
        if ray.is_initialized():
            from ray import serve

            serve.shutdown()
            ray.shutdown()
        if was_local and restore:
            init_local_ray(_LOCAL_RAY["metrics_port"])


SERVE_MODEL_ARGS = {"model": "synthetic:mobilefacenet", "backend": "onnx"}


def deploy(name: str, args: dict | None = None, **options) -> None:
    """Deploy (or update) Serve application ``name`` at route ``/name``, 0-CPU replicas,
    serving ``synthetic:mobilefacenet`` on the onnx backend unless ``args`` say otherwise."""
    from ray import serve

    from serve_app.app import bind_app

    options.setdefault("ray_actor_options", {"num_cpus": 0})
    serve.run(bind_app({**SERVE_MODEL_ARGS, **(args or {})}, **options), name=name, route_prefix=f"/{name}")


def deploy_from_config(name: str, user_config: dict, args: dict | None = None) -> None:
    """Deploy application ``name`` the way ``serve deploy`` / KubeRay do: a declarative
    Serve config (import path + args + deployment options), applied by the controller.
    Only this path keeps the code version stable, so a ``user_config`` change reconfigures
    replicas in place instead of replacing them."""
    import time

    from ray import serve
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema

    schema = ServeDeploySchema.model_validate({"applications": [{
        "name": name,
        "route_prefix": f"/{name}",
        "import_path": "serve_app.app:build_app",
        "args": {**SERVE_MODEL_ARGS, **(args or {})},
        "deployments": [{
            "name": "EmbeddingDeployment",
            "ray_actor_options": {"num_cpus": 0},
            "user_config": user_config,
        }],
    }]})
    _get_global_client().deploy_apps(schema, _blocking=False)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        app = serve.status().applications.get(name)
        deployment = app.deployments.get("EmbeddingDeployment") if app else None
        if app and app.status == "RUNNING" and deployment and deployment.status == "HEALTHY":
            return
        time.sleep(0.5)
    raise TimeoutError(f"application {name} not RUNNING: {serve.status().applications.get(name)}")


def png_bomb(width: int, height: int) -> bytes:
    """A small, well-formed PNG whose header declares ``width`` x ``height`` RGB pixels: what a
    decompression bomb looks like to a decoder (its pixel data is cut short; the header is
    what a size check must read before anything allocates width x height x 3 bytes)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB, no interlace
    rows = zlib.compress(b"\x00" * (1 + 3 * min(width, 4096)) * 4)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", rows) + chunk(b"IEND", b"")


def dashboard_queries() -> list[str]:
    """Every PromQL expression of cluster/grafana/arcface-serve.json (panels, template variables)."""
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "cluster" / "grafana" / "arcface-serve.json"
    dash = json.loads(path.read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    exprs += [v["query"]["query"] for v in dash["templating"]["list"] if isinstance(v.get("query"), dict)]
    return exprs
