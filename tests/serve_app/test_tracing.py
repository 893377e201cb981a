"""Tracing end to end: ``arcface serve`` from a config with ``tracing_config`` on exports Serve's
spans and ours (decode, queue, encode) over OTLP/HTTP to a collector running in this process."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import cv2
import pytest
import yaml
from support import free_port

from serve_app.client import EmbeddingClient

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]


class Collector:
    """An OTLP/HTTP trace receiver (``POST /v1/traces``, protobuf): the spans it got."""

    def __init__(self) -> None:
        from opentelemetry.proto.collector.trace.v1 import trace_service_pb2

        spans: list = []
        self.spans = spans

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["content-length"]))
                request = trace_service_pb2.ExportTraceServiceRequest.FromString(body)
                for resource in request.resource_spans:
                    for scope in resource.scope_spans:
                        spans.extend(scope.spans)
                self.send_response(200)
                self.send_header("content-type", "application/x-protobuf")
                self.end_headers()
                self.wfile.write(trace_service_pb2.ExportTraceServiceResponse().SerializeToString())

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1/traces"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def names(self) -> set[str]:
        return {span.name for span in self.spans}


def test_serve_and_our_spans_reach_an_otlp_collector(tmp_path):
    collector = Collector()
    config = yaml.safe_load((REPO / "config" / "serve.yaml").read_text())
    config["tracing_config"] = {**config["tracing_config"], "enabled": True, "sampling_ratio": 1.0}
    env_vars = config["controller_options"]["runtime_env"]["env_vars"]
    env_vars["OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"] = collector.url
    deployment = config["applications"][0]["deployments"][0]
    deployment.pop("autoscaling_config")
    deployment["num_replicas"] = 1
    deployment["ray_actor_options"]["num_cpus"] = 0
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump(config))
    http_port = free_port()
    env = {**os.environ, "ARCFACE_MODEL": "synthetic:mobilefacenet", "ARCFACE_BACKEND": "onnx"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "engines", "serve", "--config", str(path), "--http-port", str(http_port),
         "--grpc-port", str(free_port()), "--exit-after", "300"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("serving "):
                break
        else:
            pytest.fail("arcface serve did not start:\n" + "".join(lines[-40:]))
        from engines.models.sample_faces import source_faces

        t1 = [f for f in source_faces() if f.image_file == "t1.jpg"][:2]
        png = cv2.imencode(".png", t1[0].image)[1].tobytes()
        with EmbeddingClient(f"http://127.0.0.1:{http_port}") as client:
            for _ in range(3):
                client.embed_images([png] * 2, landmarks=[f.landmarks for f in t1])
        deadline = time.monotonic() + 60
        wanted = {"arcface.decode", "arcface.queue", "arcface.encode"}
        while not wanted <= collector.names() and time.monotonic() < deadline:
            time.sleep(0.5)
    finally:
        proc.send_signal(2)
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
        collector.server.shutdown()
    names = collector.names()
    assert wanted <= names, sorted(names)
    ours = [s for s in collector.spans if s.name in wanted]
    serve_ids = {s.span_id for s in collector.spans if s.name not in wanted}
    assert serve_ids, f"no span of Serve's own: {sorted(names)}"  # the proxy's and the replica's
    decode = [s for s in ours if s.name == "arcface.decode"]
    assert all(s.parent_span_id in serve_ids for s in decode)  # inside Serve's request span
    attrs = {kv.key: kv.value for s in ours if s.name == "arcface.encode" for kv in s.attributes}
    assert attrs["arcface.batch_faces"].int_value >= 2
    queue = [s for s in ours if s.name == "arcface.queue"]
    assert all(s.end_time_unix_nano >= s.start_time_unix_nano for s in queue)
    assert {s.trace_id for s in decode} & {s.trace_id for s in queue}  # one trace per request
