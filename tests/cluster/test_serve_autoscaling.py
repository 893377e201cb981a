"""The Serve application scales out onto new GPU nodes under load, and back in after it.

The real application from ``config/serve.yaml`` (``launch.load_serve_config`` +
``launch.start``, what ``arcface serve`` does), with its replicas asking for one
A10G GPU each: the head has none, so every replica needs a fake A10G node, and
every replica beyond the first needs a node the autoscaler must launch. Real HTTP
load (closed-loop clients posting one face each) drives Serve's autoscaler; the
test records replicas and nodes over time, and prints and saves that timeline.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import threading
import time
from dataclasses import asdict, dataclass

import numpy as np
import pytest
from fake_cluster import wait_until, worker_nodes
from support import free_port

from serve_app.codec import NPY_MEDIA_TYPE, encode_npy

pytestmark = pytest.mark.integration

APP, DEPLOYMENT = "arcface", "EmbeddingDeployment"
MAX_REPLICAS = 3
AUTOSCALING = {
    "min_replicas": 1,
    "max_replicas": MAX_REPLICAS,
    "target_ongoing_requests": 2,  # 12 clients -> 6 wanted, capped at 3
    "upscale_delay_s": 2,
    "downscale_delay_s": 4,
    "look_back_period_s": 11,  # > the (deprecated) metrics_interval_s default of 10 s
}
CLIENTS = 12


@dataclass
class Sample:
    t: float
    replicas_running: int
    replicas_other: int  # starting, pending on a node, stopping
    gpu_nodes: int
    gpus_in_use: float
    phase: str


class Timeline:
    def __init__(self) -> None:
        self.t0 = time.monotonic()
        self.samples: list[Sample] = []
        self.phase = "deploy"

    def sample(self) -> Sample:
        import ray
        from ray import serve

        app = serve.status().applications.get(APP)
        dep = app.deployments.get(DEPLOYMENT) if app else None
        states = {str(getattr(k, "value", k)): v for k, v in (dep.replica_states if dep else {}).items()}
        running = states.get("RUNNING", 0)
        gpus = ray.cluster_resources().get("GPU", 0.0) - ray.available_resources().get("GPU", 0.0)
        s = Sample(round(time.monotonic() - self.t0, 1), running, sum(states.values()) - running,
                   len(worker_nodes()), round(gpus, 2), self.phase)
        self.samples.append(s)
        return s

    def changes(self) -> list[Sample]:
        """Samples where replicas, nodes or phase changed (the timeline worth reading)."""
        out: list[Sample] = []
        for s in self.samples:
            key = (s.replicas_running, s.replicas_other, s.gpu_nodes, s.phase)
            if not out or key != (out[-1].replicas_running, out[-1].replicas_other, out[-1].gpu_nodes,
                                  out[-1].phase):
                out.append(s)
        return out

    def wait(self, predicate, timeout_s: float, what: str) -> Sample:
        """The first sample the poller takes from now on that satisfies ``predicate``."""
        deadline = time.monotonic() + timeout_s
        seen = len(self.samples)
        while True:
            for s in self.samples[seen:]:
                if predicate(s):
                    return s
            seen = len(self.samples)
            if time.monotonic() > deadline:
                raise AssertionError(f"{what} not reached in {timeout_s:.0f} s; timeline:\n{self.render()}")
            time.sleep(0.2)

    def poll(self, stop: threading.Event, interval_s: float = 0.5) -> None:
        while not stop.is_set():
            with contextlib.suppress(Exception):  # Serve still starting: nothing to count yet
                self.sample()
            stop.wait(interval_s)

    def render(self) -> str:
        rows = ["    t  phase    running  other  gpu_nodes  gpus_in_use"]
        rows += [f"{s.t:5.1f}  {s.phase:<7}  {s.replicas_running:7d}  {s.replicas_other:5d}  "
                 f"{s.gpu_nodes:9d}  {s.gpus_in_use:11.2f}" for s in self.changes()]
        return "\n".join(rows)


class Load:
    """Closed-loop HTTP clients, one face per request, until stopped."""

    def __init__(self, port: int, clients: int) -> None:
        from engines.models.sample_faces import jittered_faces

        faces = jittered_faces(clients, seed=11).faces
        self.bodies = [encode_npy(faces[i : i + 1]) for i in range(clients)]
        self.port = port
        self.stop = threading.Event()
        self.ok = 0
        self.errors: dict[str, int] = {}
        self.bad_shapes = 0
        self._lock = threading.Lock()
        self.threads = [threading.Thread(target=self._client, args=(i,), daemon=True) for i in range(clients)]

    def _client(self, i: int) -> None:
        import io

        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        headers = {"content-type": NPY_MEDIA_TYPE, "accept": NPY_MEDIA_TYPE}
        while not self.stop.is_set():
            try:
                conn.request("POST", "/v1/embed", body=self.bodies[i], headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                status = str(resp.status)
            except (OSError, http.client.HTTPException) as exc:
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
                status, data = type(exc).__name__, b""
            with self._lock:
                if status == "200":
                    self.ok += 1
                    if np.load(io.BytesIO(data)).shape != (1, 512):
                        self.bad_shapes += 1
                else:
                    self.errors[status] = self.errors.get(status, 0) + 1
        conn.close()

    def __enter__(self) -> Load:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=60)


def info(port: int) -> dict:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("GET", "/v1/info")
    body = json.loads(conn.getresponse().read())
    conn.close()
    return body


def test_serve_scales_out_onto_new_gpu_nodes_and_back_in(fake_cluster, tmp_path):
    from ray import serve
    from ray.serve.config import ProxyLocation

    from serve_app import launch

    http_port = free_port()
    config = launch.load_serve_config(
        None, http_host="127.0.0.1", http_port=http_port, grpc_port=free_port(),
        # A GPU cluster's settings: TensorRT first. The fake GPU nodes have no device,
        # so every replica must fall back to the onnx backend on the CPU, cleanly.
        # max_queue_wait_s: every request of the load is served (503s would only thin the load
        # the autoscaler reacts to; the bound itself is tested in tests/serve_app).
        app_args={"model": "synthetic:mobilefacenet", "backend": "tensorrt", "max_queue_wait_s": 30},
        deployment={
            "autoscaling_config": AUTOSCALING,
            "ray_actor_options": {"num_cpus": 1, "num_gpus": 1, "accelerator_type": "A10G"},
            "graceful_shutdown_wait_loop_s": 1,
            "graceful_shutdown_timeout_s": 5,
        },
    )
    # One proxy, on the head: a proxy per fake node would only cost this small machine CPU.
    config = config.model_copy(update={"proxy_location": ProxyLocation.HeadOnly})
    wait_until(lambda: not worker_nodes(), 90, what="no GPU node up before the service asks for one")
    timeline = Timeline()
    poller_stop = threading.Event()
    poller = threading.Thread(target=timeline.poll, args=(poller_stop,), daemon=True)
    poller.start()
    try:
        launch.start(config, timeout_s=180)
        first = timeline.wait(lambda s: s.replicas_running == 1 and s.gpu_nodes == 1, 60,
                              "1 replica on 1 node")
        engine = info(http_port)
        assert (engine["backend"], engine["device"]) == ("onnx", "cpu"), engine
        attempts = {a["backend"]: a["status"] for a in engine["fallback"]["attempts"]}
        assert attempts == {"tensorrt": "unavailable", "onnx": "selected"}, engine["fallback"]
        timeline.phase = "load"
        with Load(http_port, CLIENTS) as load:
            peak = timeline.wait(lambda s: s.replicas_running == MAX_REPLICAS, 150,
                                 f"{MAX_REPLICAS} running replicas under load")
            time.sleep(3)  # hold the peak for a moment: the scale-out must be stable
        timeline.phase = "idle"
        requests_during_load = load.ok
        timeline.wait(lambda s: s.replicas_running == 1 and s.replicas_other == 0, 120,
                      "scale-in to 1 replica after the load")
        timeline.wait(lambda s: s.gpu_nodes == 1, 90, "idle GPU nodes terminated")
        assert info(http_port)["backend"] == "onnx"  # the survivor still serves
    finally:
        poller_stop.set()
        poller.join(timeout=10)
        serve.shutdown()
        report = {"autoscaling_config": AUTOSCALING, "clients": CLIENTS,
                  "timeline": [asdict(s) for s in timeline.changes()],
                  "samples": [asdict(s) for s in timeline.samples]}
        (tmp_path / "serve_scaling_timeline.json").write_text(json.dumps(report, indent=1))
        print(f"\nServe scaling timeline ({tmp_path / 'serve_scaling_timeline.json'}):\n{timeline.render()}")

    assert load.errors == {} and load.bad_shapes == 0, (load.errors, load.bad_shapes)
    assert requests_during_load > 0
    samples = timeline.samples
    assert first.replicas_running == 1 and first.gpu_nodes == 1
    assert max(s.replicas_running for s in samples) == MAX_REPLICAS
    # every replica holds a whole GPU and the nodes have one each: new replicas meant new nodes
    assert max(s.gpu_nodes for s in samples) >= MAX_REPLICAS
    assert peak.gpu_nodes >= peak.replicas_running
    last = samples[-1]
    assert (last.replicas_running, last.gpu_nodes) == (1, 1)
