"""One ``arcface serve`` process, with its own Ray, shared by the tests that need a whole
started service (each start costs about a minute of this 2-core host's CPU), in this order:

1. tracing: Serve's spans and ours (decode, queue, encode) reach an OTLP/HTTP collector
   running in this process (``tracing_config`` on, every request sampled);
2. ``arcface bench-overload --url``: 503 rate, latency and recovery against it;
3. kill -9 of the replica and of the proxy under load, last: what the requests in flight get,
   and how long until the service answers again. The processes killed are ones this module
   started (found among that process's descendants, never by name alone). The measured times
   are printed (``pytest -s``) and written to ``$ARCFACE_FAULTS_JSON`` when set; README
   "Faults and recovery" quotes them.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import psutil
import pytest
import requests
import yaml
from otlp_collector import Collector
from processes import wait_for
from support import free_port

from serve_app.codec import NPY_MEDIA_TYPE, encode_npy
from serve_app.launch import DEFAULT_SERVE_CONFIG
from serve_app.protos import embedding_pb2 as pb
from serve_app.protos import embedding_pb2_grpc as pb_grpc

pytestmark = [pytest.mark.integration, pytest.mark.slow]

NPY = {"content-type": NPY_MEDIA_TYPE}
RESULTS: dict[str, dict] = {}


@dataclass
class Service:
    proc: subprocess.Popen
    http: str
    grpc: str
    collector: Collector

    def descendants(self) -> list[psutil.Process]:
        return psutil.Process(self.proc.pid).children(recursive=True)

    def own(self, pid: int) -> psutil.Process:
        """``pid`` if it is one of this service's processes; fails the test otherwise."""
        for child in self.descendants():
            if child.pid == pid:
                return child
        pytest.fail(f"pid {pid} is not a process of the service this test started")

    def proxy(self) -> psutil.Process:
        found = [p for p in self.descendants() if "ProxyActor" in " ".join(p.cmdline())]
        assert len(found) == 1, [p.cmdline() for p in found]
        return found[0]


@pytest.fixture(scope="module")
def service(tmp_path_factory) -> Service:
    """`arcface serve` on free ports: one replica of the mobilefacenet engine; a queue wait long
    enough that the requests sent here are admitted even on a busy host (they must be in flight
    when a kill comes; after a proxy kill the replica still runs what it admitted); tracing on,
    every request sampled, exported to a collector in this process."""
    collector = Collector()
    config = yaml.safe_load(DEFAULT_SERVE_CONFIG.read_text())
    config["tracing_config"] = {**config["tracing_config"], "enabled": True, "sampling_ratio": 1.0}
    env_vars = config["controller_options"]["runtime_env"]["env_vars"]
    env_vars["OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"] = collector.url
    app = config["applications"][0]
    app["args"].update({"model": "synthetic:mobilefacenet", "backend": "onnx", "max_queue_wait_s": 30})
    dep = app["deployments"][0]
    dep.pop("autoscaling_config")
    dep.update({"num_replicas": 1, "health_check_period_s": 2})
    path = tmp_path_factory.mktemp("served") / "serve.yaml"
    path.write_text(yaml.safe_dump(config))
    http_port, grpc_port = free_port(), free_port()
    log = open(path.parent / "serve.log", "w")  # noqa: SIM115 (closed at teardown)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # its own Ray, never ours
    env["OTEL_BSP_SCHEDULE_DELAY"] = "500"  # spans exported every 0.5 s, not 5 s: the test waits less
    proc = subprocess.Popen([sys.executable, "-m", "engines", "serve", "--config", str(path),
                             "--http-port", str(http_port), "--grpc-port", str(grpc_port)],
                            stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    svc = Service(proc, f"http://127.0.0.1:{http_port}", f"127.0.0.1:{grpc_port}", collector)
    try:
        wait_for("arcface serve answering", lambda: _running(svc, log.name) and _answers(svc),
                 timeout_s=240, every_s=0.5)
        yield svc
    finally:
        proc.send_signal(signal.SIGINT)  # arcface serve shuts Serve and its Ray down
        try:
            proc.wait(90)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # its own session: only what it started
            proc.wait(30)
        log.close()
        collector.server.shutdown()
        out = os.environ.get("ARCFACE_FAULTS_JSON")
        if out and RESULTS:
            Path(out).write_text(json.dumps(RESULTS, indent=2))


def _running(svc: Service, log: str) -> bool:
    assert svc.proc.poll() is None, "arcface serve exited:\n" + Path(log).read_text()[-3000:]
    return True


def _answers(svc: Service, faces: np.ndarray | None = None) -> bool:
    body = encode_npy(np.zeros((1, 112, 112, 3), np.uint8) if faces is None else faces[:1])
    try:
        return requests.post(svc.http + "/v1/embed", data=body, headers=NPY, timeout=10).status_code == 200
    except requests.RequestException:
        return False


def _recovery_s(svc: Service, since: float, faces, timeout_s: float = 180) -> float:
    while time.monotonic() - since < timeout_s:
        if _answers(svc, faces):
            return time.monotonic() - since
        time.sleep(0.2)
    pytest.fail(f"no answer {timeout_s:.0f} s after the kill")


def _accepted(svc: Service, body: bytes, timeout_s: float = 180) -> None:
    """Send ``body`` until the service answers 200, waiting each refusal's ``Retry-After`` as a
    client does: after the previous test's kill and recovery the proxy may still shed for a
    window, and this waits for the service to accept again instead of racing that window."""
    deadline = time.monotonic() + timeout_s
    while True:
        resp = requests.post(svc.http + "/v1/embed", data=body, headers=NPY, timeout=120)
        if resp.status_code == 200:
            return
        assert resp.status_code == 503 and time.monotonic() < deadline, resp.text
        time.sleep(int(resp.headers["retry-after"]))


def _admitted_faces(svc: Service) -> int:
    info = requests.get(svc.http + "/v1/info", timeout=30).json()
    return info["service"]["pending_faces"]


def _load(svc: Service, faces: np.ndarray, kill, n: int = 12):
    """``n`` requests of 64 faces in flight (HTTP, and one gRPC), ``kill()`` once the replica
    reports faces admitted and not finished (together a few seconds of engine work: within
    max_queue_wait_s, so admitted), i.e. while requests are in flight: an event, not a clock.

    One such request first, answered: the service accepts again (see ``_accepted``)."""
    heavy = encode_npy(np.repeat(faces, 4, axis=0)[:64])
    _accepted(svc, heavy)

    def http(_):
        try:
            resp = requests.post(svc.http + "/v1/embed", data=heavy, headers=NPY, timeout=120)
            return resp.status_code, resp
        except requests.RequestException as exc:
            return type(exc).__name__, None

    def grpc_call():
        with grpc.insecure_channel(svc.grpc) as channel:
            stub = pb_grpc.EmbeddingServiceStub(channel)
            try:
                stub.EmbedBatch(pb.EmbedBatchRequest(crops=np.repeat(faces, 4, axis=0)[:64].tobytes()),
                                metadata=(("application", "arcface"),), timeout=120)
                return "OK", ""
            except grpc.RpcError as err:
                return err.code().name, err.details()

    with ThreadPoolExecutor(n + 1) as pool:
        https = [pool.submit(http, i) for i in range(n)]
        rpc = pool.submit(grpc_call)
        wait_for("requests in flight on the replica", lambda: _admitted_faces(svc) >= 64, every_s=0.02)
        killed_at = kill()
        return [f.result() for f in https], rpc.result(), killed_at


OUR_SPANS = {"arcface.decode", "arcface.queue", "arcface.encode"}


def _traced(collector: Collector) -> list | None:
    """The spans, once ours of a request have arrived with the Serve span each decode ran in
    (the exporters send on their own schedule: the test waits for this event, not a clock)."""
    spans = collector.received()
    names = {span.name for span in spans}
    serve_ids = {span.span_id for span in spans if span.name not in OUR_SPANS}
    decode = [span for span in spans if span.name == "arcface.decode"]
    if names >= OUR_SPANS and all(span.parent_span_id in serve_ids for span in decode):
        return spans
    return None


def test_serve_and_our_spans_reach_an_otlp_collector(service):
    import cv2

    from engines.models.sample_faces import source_faces
    from serve_app.client import EmbeddingClient

    t1 = [f for f in source_faces() if f.image_file == "t1.jpg"][:2]
    png = cv2.imencode(".png", t1[0].image)[1].tobytes()
    with EmbeddingClient(service.http) as client:
        for _ in range(3):
            client.embed_images([png] * 2, landmarks=[f.landmarks for f in t1])
    spans = wait_for("our spans and Serve's at the collector", lambda: _traced(service.collector),
                     timeout_s=120)
    ours = [s for s in spans if s.name in OUR_SPANS]
    serve_ids = {s.span_id for s in spans if s.name not in OUR_SPANS}
    assert serve_ids, f"no span of Serve's own: {sorted({s.name for s in spans})}"  # proxy's and replica's
    decode = [s for s in ours if s.name == "arcface.decode"]
    assert decode and all(s.parent_span_id in serve_ids for s in decode)  # inside Serve's request span
    attrs = {kv.key: kv.value for s in ours if s.name == "arcface.encode" for kv in s.attributes}
    assert attrs["arcface.batch_faces"].int_value >= 2
    queue = [s for s in ours if s.name == "arcface.queue"]
    assert all(s.end_time_unix_nano >= s.start_time_unix_nano for s in queue)
    assert {s.trace_id for s in decode} & {s.trace_id for s in queue}  # one trace per request


def test_bench_overload_measures_503s_latency_and_recovery(service):
    """``arcface bench-overload`` against the running service (``--url``; its ``--start`` path is
    ``bench-serve --start``'s, tested in test_launch.py, and ``--replicas`` is a config override
    tested there too)."""
    env = {**os.environ, "ARCFACE_MODEL": "synthetic:mobilefacenet", "ARCFACE_BACKEND": "onnx"}
    proc = subprocess.run(
        [sys.executable, "-m", "engines", "bench-overload", "--url", service.http,
         "--factors", "2,4", "--duration", "1", "--repeat", "2",
         "--calibrate", "1", "--capacity-clients", "8", "--recovery-timeout", "30", "--json"],
        capture_output=True, text=True, timeout=600, env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["unloaded"]["p99_ms"] >= out["unloaded"]["p50_ms"] > 0
    assert out["capacity"]["requests_per_s"] > 0 and not out["capacity"]["given"]
    assert [(p["factor"], p["repeat"]) for p in out["points"]] == [(2, 0), (4, 0), (2, 1), (4, 1)]
    for point in out["points"]:
        assert point["sent"] > 0 and point["offered_rps"] == pytest.approx(
            point["factor"] * out["capacity"]["requests_per_s"])
        assert 0 <= point["rate_503"] <= 1 and sum(point["statuses"].values()) == point["sent"]
        assert point["errors_not_our_shape"] == 0 and point["rejections_without_retry_after"] == 0
        assert point["recovery_s"] is not None
    assert set(out["summary"]) == {"x2", "x4"} and out["summary"]["x2"]["rate_503"]["missing"] == 0
    assert out["engine"]["backend"] == "onnx" and out["cpu"]


def test_kill_9_of_the_replica_answers_its_requests_503_and_recovers(service, faces):
    pid = requests.get(service.http + "/v1/info", timeout=30).json()["service"]["pid"]
    replica = service.own(pid)

    def kill():
        replica.send_signal(signal.SIGKILL)
        return time.monotonic()

    answers, rpc, killed_at = _load(service, faces, kill)
    recovery = _recovery_s(service, killed_at, faces)
    codes = [code for code, _ in answers]
    assert set(codes) <= {200, 503}, codes  # never a 500, never a dropped connection
    reasons = [resp.json()["error"]["reason"] for code, resp in answers if code == 503]
    assert "replica_unavailable" in reasons, f"nothing was in flight when the replica died: {reasons}"
    for code, resp in answers:
        if code == 503:  # in flight on the dead replica, or refused at admission before the kill
            assert resp.headers["content-type"] == "application/json"
            assert int(resp.headers["retry-after"]) >= 1
            assert resp.json()["error"]["reason"] in ("replica_unavailable", "overloaded"), resp.text
            for leak in ("Traceback", "pid", "ray::", "RayActorError", ".py"):
                assert leak not in resp.text
    assert rpc[0] in ("OK", "UNAVAILABLE"), rpc
    if rpc[0] == "UNAVAILABLE":
        assert rpc[1].startswith(("replica_unavailable: ", "unavailable: ", "overloaded: ")), rpc
    outcomes = Counter(f"{c} {r.json()['error']['reason']}" if c == 503 else str(c) for c, r in answers)
    RESULTS["replica"] = {"in_flight": dict(outcomes),
                          "grpc_in_flight": rpc[0], "recovery_s": round(recovery, 1)}
    print(f"\nkill -9 replica: in flight {RESULTS['replica']['in_flight']}, gRPC {rpc[0]}, "
          f"answering again after {recovery:.1f} s")
    new_pid = requests.get(service.http + "/v1/info", timeout=30).json()["service"]["pid"]
    assert new_pid != pid


def test_kill_9_of_the_proxy_drops_its_connections_and_recovers(service, faces):
    proxy = service.proxy()

    def kill():
        proxy.send_signal(signal.SIGKILL)
        return time.monotonic()

    answers, rpc, killed_at = _load(service, faces, kill)
    recovery = _recovery_s(service, killed_at, faces)
    codes = [str(code) for code, _ in answers]
    # the process holding those connections is gone: nothing can answer them (a client retries);
    # a 503 is a refusal at admission before the kill
    assert set(codes) <= {"200", "503", "ConnectionError", "ChunkedEncodingError"}, codes
    assert any(code.endswith("Error") for code in codes), f"nothing was in flight: {codes}"
    for code, resp in answers:
        if code == 503:
            assert resp.json()["error"]["reason"] == "overloaded", resp.text
    assert rpc[0] in ("OK", "UNAVAILABLE"), rpc
    RESULTS["proxy"] = {"in_flight": dict(Counter(codes)), "grpc_in_flight": rpc[0],
                        "recovery_s": round(recovery, 1)}
    print(f"\nkill -9 proxy: in flight {RESULTS['proxy']['in_flight']}, gRPC {rpc[0]}, "
          f"answering again after {recovery:.1f} s")
    assert service.proxy().pid != proxy.pid
