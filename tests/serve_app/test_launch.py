"""config/serve.yaml and the CLI paths that start the service from it."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from support import free_port

from serve_app.launch import load_serve_config
from serve_app.settings import parse_settings, parse_user_config


def test_serve_yaml_is_a_valid_serve_deploy_config():
    config = load_serve_config()
    app = config.applications[0]
    assert app.import_path == "serve_app.app:build_app"
    parse_settings(app.args)  # our own args are typed too
    dep = app.deployments[0]
    parse_user_config(dep.user_config)
    assert dep.max_ongoing_requests >= dep.user_config["max_batch_size"]
    assert config.grpc_options.grpc_servicer_functions == [
        "serve_app.protos.embedding_pb2_grpc.add_EmbeddingServiceServicer_to_server"
    ]


def test_overrides_and_bad_files(tmp_path):
    config = load_serve_config(http_port=1234, grpc_port=4321, app_args={"max_body_mb": 1})
    assert config.http_options.port == 1234 and config.grpc_options.port == 4321
    assert config.applications[0].args["max_body_mb"] == 1
    from engines.errors import ConfigError

    bad = tmp_path / "serve.yaml"
    bad.write_text("applications: [{name: x, import_path: 3, nonsense_key: 1}]")
    with pytest.raises(ConfigError, match="not a valid Serve deploy config"):
        load_serve_config(bad)
    with pytest.raises(ConfigError, match="not found"):
        load_serve_config(tmp_path / "missing.yaml")


@pytest.mark.integration
def test_bench_serve_starts_the_service_from_config_and_measures_it():
    env = {**os.environ, "ARCFACE_MODEL": "synthetic:mobilefacenet", "ARCFACE_BACKEND": "onnx"}
    proc = subprocess.run(
        [sys.executable, "-m", "engines", "bench-serve", "--start", "--http-port", str(free_port()),
         "--concurrency", "4", "--faces-per-request", "2", "--duration", "3", "--warmup", "1", "--json"],
        capture_output=True, text=True, timeout=600, env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["requests"] > 0 and out["errors"] == {}
    assert out["engine"]["backend"] == "onnx" and out["engine"]["model_id"] == "synthetic-mobilefacenet"
    assert out["latency_ms_p99"] >= out["latency_ms_p50"] > 0
    assert out["observed_mean_batch_faces"] >= 2
    assert out["inprocess_fps"] > 0 and out["ratio_to_inprocess"] > 0
