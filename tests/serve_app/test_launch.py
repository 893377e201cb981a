"""config/serve.yaml and the CLI paths that start the service from it."""

from __future__ import annotations

import importlib
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from support import free_port

from engines import EngineError
from serve_app.launch import check_ports_free, controller_options, load_serve_config, proxy_env
from serve_app.proxy_hooks import GRPC_SERVICER, HTTP_CALLBACK
from serve_app.settings import parse_settings, parse_user_config


def test_serve_yaml_is_a_valid_serve_deploy_config():
    config = load_serve_config()
    app = config.applications[0]
    assert app.import_path == "serve_app.app:build_app"
    settings = parse_settings(app.args)  # our own args are typed too
    dep = app.deployments[0]
    parse_user_config(dep.user_config)
    assert dep.max_ongoing_requests >= dep.user_config["max_batch_size"]
    assert config.grpc_options.grpc_servicer_functions == [GRPC_SERVICER]
    # loopback unless a cluster config says otherwise (cluster/ binds 0.0.0.0 and requires auth)
    assert config.http_options.host == "127.0.0.1" and settings.require_auth is False
    # every 503 of Serve's proxy carries Retry-After, as ours do
    assert dep.backpressure_config.retry_after_s == settings.retry_after_s


def test_the_proxy_environment_travels_with_the_config():
    """What Serve's proxies read at start: our error-shape middleware and a gRPC message limit
    equal to max_body_mb (checked against the file, which `serve deploy` and KubeRay use as is)."""
    config = load_serve_config()
    env = config.controller_options.runtime_env["env_vars"]
    body = int(parse_settings(config.applications[0].args).max_body_mb * (1 << 20))
    assert env["RAY_SERVE_GRPC_MAX_MESSAGE_SIZE"] == str(body)
    assert env["RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"] == HTTP_CALLBACK
    assert proxy_env(config) == env
    module, name = HTTP_CALLBACK.split(":")
    assert callable(getattr(importlib.import_module(module), name))
    module, name = GRPC_SERVICER.rsplit(".", 1)
    assert callable(getattr(importlib.import_module(module), name))
    # a config without controller_options gets the same from launch (the largest max_body_mb)
    bare = load_serve_config(app_args={"max_body_mb": 2})
    bare = bare.model_copy(update={"controller_options": None})
    opts = controller_options(bare)["runtime_env"]["env_vars"]
    assert opts["RAY_SERVE_GRPC_MAX_MESSAGE_SIZE"] == str(2 << 20)
    assert opts["RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"] == HTTP_CALLBACK


@pytest.mark.parametrize("kind", ["http", "grpc"])
def test_a_taken_port_is_refused_before_serve_starts(kind):
    """Serve's proxy binds with SO_REUSEPORT: a second service on a taken port would start and
    share it. The check sees a listener that set SO_REUSEPORT itself (as Serve's does)."""
    listener = socket.socket(socket.AF_INET6 if kind == "grpc" else socket.AF_INET)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    listener.bind(("::" if kind == "grpc" else "127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]
    try:
        ports = {"http_port": port, "grpc_port": free_port()} if kind == "http" else {
            "http_port": free_port(), "grpc_port": port}
        config = load_serve_config(http_host="127.0.0.1", **ports)
        name = "HTTP" if kind == "http" else "gRPC"
        with pytest.raises(EngineError, match=rf"{name} port {port} .*not free \(in use\).*SO_REUSEPORT"):
            check_ports_free(config)
    finally:
        listener.close()
    check_ports_free(config)  # free again


@pytest.mark.slow  # a real `arcface serve` process (7 s: the conftest's budget for unmarked tests is 5 s)
def test_arcface_serve_exits_with_a_clear_message_on_a_taken_port():
    with socket.socket() as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        proc = subprocess.run(
            [sys.executable, "-m", "engines", "serve", "--http-port", str(port),
             "--grpc-port", str(free_port()), "--exit-after", "1"],
            capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert f"HTTP port {port} on 127.0.0.1 is not free" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_overrides_and_bad_files(tmp_path):
    config = load_serve_config(http_port=1234, grpc_port=4321, app_args={"max_body_mb": 1})
    assert config.http_options.port == 1234 and config.grpc_options.port == 4321
    assert config.applications[0].args["max_body_mb"] == 1
    # bench-overload --start --replicas N: a fixed capacity instead of the config's autoscaling
    fixed = load_serve_config(deployment={"num_replicas": 2, "autoscaling_config": None})
    deployment = fixed.applications[0].deployments[0]
    assert deployment.num_replicas == 2 and deployment.autoscaling_config is None
    from engines.errors import ConfigError

    bad = tmp_path / "serve.yaml"
    bad.write_text("applications: [{name: x, import_path: 3, nonsense_key: 1}]")
    with pytest.raises(ConfigError, match="not a valid Serve deploy config"):
        load_serve_config(bad)
    with pytest.raises(ConfigError, match="not found"):
        load_serve_config(tmp_path / "missing.yaml")


@pytest.mark.integration
def test_bench_serve_starts_the_service_from_config_and_measures_it(tmp_path):
    env = {**os.environ, "ARCFACE_MODEL": "synthetic:mobilefacenet", "ARCFACE_BACKEND": "onnx"}
    # config/serve.yaml with a queue wait a busy test host cannot exceed: this test is about
    # bench-serve, not admission (tests/serve_app/test_service.py bounds that)
    config = yaml.safe_load((Path(__file__).parents[2] / "config" / "serve.yaml").read_text())
    config["applications"][0]["args"]["max_queue_wait_s"] = 60
    (tmp_path / "serve.yaml").write_text(yaml.safe_dump(config))
    proc = subprocess.run(
        [sys.executable, "-m", "engines", "bench-serve", "--start", "--config", str(tmp_path / "serve.yaml"),
         "--http-port", str(free_port()), "--grpc-port", str(free_port()),
         "--concurrency", "4", "--faces-per-request", "2", "--duration", "3", "--warmup", "1", "--json"],
        capture_output=True, text=True, timeout=600, env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["requests"] > 0 and out["errors"] == {} and out["transport"] == "http"
    assert out["engine"]["backend"] == "onnx" and out["engine"]["model_id"] == "synthetic-mobilefacenet"
    assert out["latency_ms_p99"] >= out["latency_ms_p50"] > 0
    assert out["observed_mean_batch_faces"] >= 2
    assert out["inprocess_fps"] > 0 and out["ratio_to_inprocess"] > 0
    # the service's CPU by role, from the processes --start launched (not the load generator)
    cpu = out["shell_cpu"]
    assert cpu["cpu_ms_per_face"] > 0 and "driver" not in cpu["cpu_s_by_role"], cpu
    assert cpu["cpu_s_by_role"].get("replica", 0) > 0 and cpu["cpu_s_by_role"].get("proxy", 0) > 0, cpu
    # the ratio's factors: the service's and the load generator's CPU against the engine's in-process,
    # whose product is the ratio (the same faces and span; the sampler's last interval aside)
    parts, client = out["ratio_parts"], out["client_cpu"]
    assert client["cpu_ms_per_face"] > 0
    assert parts["run_cpu_ms_per_face"] == pytest.approx(cpu["cpu_ms_per_face"] + client["cpu_ms_per_face"],
                                                         abs=1e-3)
    assert parts["engine_share_of_cpu"] * parts["cores_busy_ratio"] == pytest.approx(
        out["ratio_to_inprocess"], rel=0.2), parts
