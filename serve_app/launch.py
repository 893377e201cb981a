"""Start and stop the service from a Serve deploy config, the way ``serve run`` does.

``arcface serve``, the demo and the load benchmark use this: validate the file
against Serve's own schema (so what works here works with ``serve run`` and
``serve deploy``), check that the ports are free, start Serve with its HTTP/gRPC
options and the proxy environment (``proxy_env``), deploy the applications and wait
until they are RUNNING.
"""

from __future__ import annotations

import errno
import logging
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engines import REPO_CONFIG_DIR, ConfigError, EngineError, read_yaml_mapping

from .proxy_hooks import HTTP_CALLBACK

logger = logging.getLogger(__name__)

DEFAULT_SERVE_CONFIG = REPO_CONFIG_DIR / "serve.yaml"
DEFAULT_MAX_BODY_MB = 16.0


def proxy_env(config) -> dict[str, str]:
    """Environment Serve's proxies need, read by them at start (they inherit the controller's
    ``runtime_env``, so it travels as ``controller_options``): our error-shape middleware, and
    the gRPC message limit equal to the largest ``max_body_mb`` of the applications (Serve's
    default is 2 GiB, received whole before any check of ours). Values the config's own
    ``controller_options`` set win."""
    body_mb = max([float((app.args or {}).get("max_body_mb", DEFAULT_MAX_BODY_MB))
                   for app in config.applications] or [DEFAULT_MAX_BODY_MB])
    env = {
        "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH": HTTP_CALLBACK,
        "RAY_SERVE_GRPC_MAX_MESSAGE_SIZE": str(int(body_mb * (1 << 20))),
    }
    given = (getattr(config, "controller_options", None) or {})
    given = given.model_dump() if hasattr(given, "model_dump") else dict(given)
    env.update(((given.get("runtime_env") or {}).get("env_vars")) or {})
    return env


def controller_options(config) -> dict[str, Any]:
    """``controller_options`` for ``serve.start``: the config's, with ``proxy_env`` filled in."""
    given = (getattr(config, "controller_options", None) or {})
    given = given.model_dump() if hasattr(given, "model_dump") else dict(given)
    runtime_env = dict(given.get("runtime_env") or {})
    runtime_env["env_vars"] = proxy_env(config)
    return {**given, "runtime_env": runtime_env}


def worker_runtime_env(config) -> dict[str, Any] | None:
    """The job's ``runtime_env`` for a local Ray: the ``OTEL_*`` variables of the proxy
    environment reach the replicas too (their spans go to the same collector). On a cluster,
    set them in the pods' environment (README "Tracing")."""
    otel = {k: v for k, v in proxy_env(config).items() if k.startswith("OTEL_")}
    return {"env_vars": otel} if otel else None


def check_auth_ready(config) -> None:
    """For a service started here, whose replicas inherit this environment: an application with
    ``require_auth`` and no token fails now, with the replica's own message, instead of after
    Ray and Serve started and the replica failed to construct."""
    from .settings import TokenAuth, parse_settings

    for app in config.applications:
        try:
            TokenAuth.from_settings(parse_settings(app.args))
        except ConfigError as exc:
            raise ConfigError(f"application {app.name!r}: {exc}") from None


def exposure(config, local: bool) -> list[str]:
    """What this service exposes, in plain words (``arcface serve`` prints it at start)."""
    from .settings import TokenAuth, parse_settings

    lines = []
    host = config.http_options.host
    if host not in ("127.0.0.1", "localhost", "::1"):
        lines.append(f"HTTP listens on {host}:{config.http_options.port}: reachable from other hosts")
    if config.grpc_options.grpc_servicer_functions:
        lines.append(f"gRPC listens on every interface ([::]:{config.grpc_options.port}; Serve has no gRPC "
                     "host option): use --no-grpc if you do not need it")
    for app in config.applications if local else ():
        settings = parse_settings(app.args)
        if not TokenAuth.from_settings(settings).enabled:
            lines.append(f"application {app.name!r}: auth is OFF (no ${settings.auth_token_env}, no "
                         "auth_token_file): anyone who reaches a port above can use it")
    return lines


def check_ports_free(config) -> None:
    """Fail with a clear message when the HTTP or gRPC port is taken. Serve's proxy binds with
    SO_REUSEPORT: on a taken port a second service would start and the kernel would split
    connections between the two. The probe binds without SO_REUSEPORT (an existing listener,
    reuse-port or not, makes that fail) and with SO_REUSEADDR (a port in TIME_WAIT is free)."""
    http = config.http_options
    probes = [("HTTP", http.host, http.port, "--http-port")]
    if config.grpc_options.grpc_servicer_functions:
        probes.append(("gRPC", "::", config.grpc_options.port, "--grpc-port"))  # Serve binds [::]
    for kind, host, port, flag in probes:
        problem = _bind_problem(host, port)
        if problem:
            raise EngineError(
                f"{kind} port {port} on {host} is not free ({problem}): another `arcface serve`, Ray Serve "
                f"or other server listens there, and Serve's proxy would share it silently (SO_REUSEPORT); "
                f"stop that one or choose another port with {flag}"
            )


def _bind_problem(host: str, port: int) -> str | None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        sock = socket.socket(family, socket.SOCK_STREAM)
    except OSError:
        if family == socket.AF_INET6:  # no IPv6 on this host: Serve's [::] means 0.0.0.0
            return _bind_problem("0.0.0.0", port)
        raise
    with sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            return "in use" if exc.errno == errno.EADDRINUSE else exc.strerror or str(exc)
    return None


@dataclass(frozen=True)
class Endpoints:
    http: str
    grpc: str | None
    applications: tuple[str, ...]


def load_serve_config(path: str | Path | None = None, **overrides: Any):
    """Parse and validate a Serve deploy config (``ServeDeploySchema``).

    ``overrides``: ``http_port``, ``grpc_port``, ``http_host``, ``grpc`` (False: no gRPC
    server), ``app_args`` (merged into every application's ``args``), ``deployment``
    (merged into every deployment's options).
    """
    from ray.serve.schema import ServeDeploySchema

    path = Path(path) if path else DEFAULT_SERVE_CONFIG
    raw = read_yaml_mapping(path, "serve config")
    if overrides.get("http_port") is not None:
        raw.setdefault("http_options", {})["port"] = overrides["http_port"]
    if overrides.get("http_host") is not None:
        raw.setdefault("http_options", {})["host"] = overrides["http_host"]
    if overrides.get("grpc_port") is not None:
        raw.setdefault("grpc_options", {})["port"] = overrides["grpc_port"]
    if overrides.get("grpc") is False:
        raw.setdefault("grpc_options", {})["grpc_servicer_functions"] = []
    for app in raw.get("applications") or []:
        if overrides.get("app_args"):
            app["args"] = {**(app.get("args") or {}), **overrides["app_args"]}
        if overrides.get("deployment"):
            for dep in app.get("deployments") or []:
                dep.update(overrides["deployment"])
    try:
        return ServeDeploySchema.model_validate(raw)
    except Exception as exc:
        raise ConfigError(f"{path}: not a valid Serve deploy config: {exc}") from exc


def start(config, address: str | None = None, num_cpus: int | None = None,
          include_dashboard: bool = False, timeout_s: float = 300.0,
          log_to_driver: bool = True) -> Endpoints:
    """Connect to (``address``) or start a local Ray (ports checked first), start Serve,
    deploy, wait for RUNNING."""
    import ray
    from ray.serve._private import api as serve_private_api
    from ray.serve.config import gRPCOptions

    if not ray.is_initialized():
        if address:
            ray.init(address=address, namespace="serve", log_to_driver=log_to_driver)
        else:
            check_auth_ready(config)
            check_ports_free(config)  # a new local Serve binds them; a cluster's may hold them already
            ray.init(num_cpus=num_cpus, include_dashboard=include_dashboard, namespace="serve",
                     object_store_memory=256 << 20, log_to_driver=log_to_driver,
                     runtime_env=worker_runtime_env(config))
    client = serve_private_api.serve_start(
        http_options=config.http_options.model_dump(),
        proxy_location=config.proxy_location,
        grpc_options=gRPCOptions(**config.grpc_options.model_dump()),
        controller_options=controller_options(config),
        global_tracing_config=config.tracing_config,
        # the config's top-level logging_config, as `serve run` / `serve deploy` apply it (it
        # reaches the proxies too, e.g. enable_access_log); None: Serve's defaults
        global_logging_config=config.logging_config,
    )
    client.deploy_apps(config, _blocking=False)
    names = tuple(app.name for app in config.applications)
    wait_running(names, timeout_s)
    http = config.http_options
    host = "127.0.0.1" if http.host in ("0.0.0.0", "::") else http.host
    grpc_port = config.grpc_options.port if config.grpc_options.grpc_servicer_functions else None
    return Endpoints(
        http=f"http://{host}:{http.port}",
        grpc=f"{host}:{grpc_port}" if grpc_port else None,
        applications=names,
    )


def wait_running(names: tuple[str, ...], timeout_s: float) -> None:
    from ray import serve

    deadline = time.monotonic() + timeout_s
    while True:
        status = serve.status()
        states = {name: status.applications.get(name) for name in names}
        failed = {n: s.message for n, s in states.items() if s is not None and s.status == "DEPLOY_FAILED"}
        if failed:
            raise EngineError(f"Serve application(s) failed to deploy: {failed}")
        if all(s is not None and s.status == "RUNNING" for s in states.values()):
            return
        if time.monotonic() > deadline:
            summary = {n: (s.status if s else "MISSING") for n, s in states.items()}
            raise EngineError(f"Serve applications not RUNNING after {timeout_s:.0f}s: {summary}")
        time.sleep(0.5)


def stop(shutdown_ray: bool = True) -> None:
    import ray
    from ray import serve

    if ray.is_initialized():
        serve.shutdown()
        if shutdown_ray:
            ray.shutdown()
