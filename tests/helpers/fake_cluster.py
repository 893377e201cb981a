"""A multi-node autoscaling Ray cluster on this machine, with fake GPU worker nodes.

The mechanism is Ray's own, the one ``ray.cluster_utils.AutoscalingCluster`` uses:
``ray start --head --autoscaling-config=...`` with ``RAY_FAKE_CLUSTER=1`` runs the
real autoscaler monitor (v1, what ``ray up`` clusters run in Ray 2.60) against the
``fake_multinode`` node provider, whose "instances" are real raylets started on this
machine with the resources and labels their node type declares. Pending tasks,
actors and Serve replicas make the autoscaler launch nodes; idle nodes are
terminated after ``idle_timeout_minutes``.

``AutoscalingCluster`` itself is not usable here, for three reasons read in
ray 2.60.0's ``ray/cluster_utils.py``:

- it loads ``autoscaler/_private/fake_multi_node/example.yaml``, which the wheel does
  not ship (FileNotFoundError);
- ``start()`` and ``shutdown()`` run ``ray stop --force``, which kills every Ray
  process of this user on the machine: the test session's other cluster, and
  anyone else's;
- the provider reaches the head at port 6379 unless ``gcs_address`` is set.

So this class writes the full config (the same keys as that example), starts the
head on a free port in its own session and temp dir, and stops exactly the process
group it started. Fake GPU nodes declare ``GPU`` and ``accelerator_type:<X>`` and the
label ``ray.io/accelerator-type``; actors placed there get ``CUDA_VISIBLE_DEVICES`` from
Ray but find no device, so engines fall back to their CPU backends.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from processes import wait_for
from support import free_port

REPO = Path(__file__).resolve().parents[2]
TESTS = Path(__file__).resolve().parent

# Compute capability and device name of the GPUs the fake node types stand for.
ARCHITECTURES = {
    "A10G": ((8, 6), "NVIDIA A10G"),
    "A100": ((8, 0), "NVIDIA A100-SXM4-40GB"),
    "H100": ((9, 0), "NVIDIA H100 80GB HBM3"),
}
ACCELERATOR_LABEL = "ray.io/accelerator-type"

# Serve pushes autoscaling metrics every 10 s by default; 1 s keeps the test short.
FAST_SERVE_METRICS = {
    "RAY_SERVE_HANDLE_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "1",
    "RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "1",
}


def gpu_node_type(accelerator: str, *, gpus: int = 1, cpus: int = 1, max_workers: int = 2,
                  object_store_mb: int = 128) -> dict[str, Any]:
    """A worker node type like a one-GPU cloud instance of ``accelerator`` (``A10G``, ...)."""
    if accelerator not in ARCHITECTURES:
        raise ValueError(f"unknown accelerator {accelerator!r}; known: {sorted(ARCHITECTURES)}")
    return {
        "resources": {"CPU": cpus, "GPU": gpus, f"accelerator_type:{accelerator}": 1,
                      "object_store_memory": object_store_mb << 20},
        "labels": {ACCELERATOR_LABEL: accelerator},
        "node_config": {},
        "min_workers": 0,
        "max_workers": max_workers,
    }


@dataclass
class FakeAutoscalingCluster:
    """Head node (CPU only, no GPU) + autoscaled fake GPU worker node types."""

    worker_node_types: dict[str, dict[str, Any]]
    head_cpus: int = 1
    head_object_store_mb: int = 160
    max_workers: int = 4
    idle_timeout_minutes: float = 0.1
    env: dict[str, str] = field(default_factory=dict)
    address: str | None = None
    temp_dir: str | None = None
    _proc: subprocess.Popen | None = None

    def config(self, gcs_address: str) -> dict[str, Any]:
        """The autoscaler config (the keys of Ray's fake_multi_node/example.yaml)."""
        types = {"ray.head.default": {"resources": {"CPU": self.head_cpus}, "node_config": {},
                                      "max_workers": 0}}
        types.update(self.worker_node_types)
        return {
            "cluster_name": "arcface-fake",
            "max_workers": self.max_workers,
            "provider": {"type": "fake_multinode", "use_node_id_as_ip": True,
                         "disable_node_updaters": True, "disable_launch_config_check": True,
                         "gcs_address": gcs_address},
            "available_node_types": types,
            "head_node_type": "ray.head.default",
            "auth": {},
            "upscaling_speed": 1.0,
            "idle_timeout_minutes": self.idle_timeout_minutes,
            "docker": {},
            "initialization_commands": [],
            "setup_commands": [],
            "head_setup_commands": [],
            "worker_setup_commands": [],
            "head_start_ray_commands": [],
            "worker_start_ray_commands": [],
            "file_mounts": {},
            "cluster_synced_files": [],
            "file_mounts_sync_continuously": False,
            "rsync_exclude": [],
            "rsync_filter": [],
        }

    def start(self, timeout_s: float = 120.0) -> str:
        """Start the head (and with it the autoscaler); returns the GCS address to ``ray.init``."""
        from ray._private.services import get_node_ip_address

        # Short path: Ray's socket paths under the temp dir have a length limit.
        self.temp_dir = tempfile.mkdtemp(prefix="rfc", dir="/tmp")
        port = free_port()
        # The provider starts worker raylets with the node IP Ray picks by default.
        self.address = f"{get_node_ip_address()}:{port}"
        config_path = Path(self.temp_dir) / "autoscaling.json"
        config_path.write_text(json.dumps(self.config(self.address)))
        env = {
            **os.environ,
            "RAY_FAKE_CLUSTER": "1",
            "AUTOSCALER_UPDATE_INTERVAL_S": "1",
            "RAY_ADDRESS": "",
            # Helper modules of the tests (actor classes) importable in every worker.
            "PYTHONPATH": os.pathsep.join(p for p in (str(TESTS), os.environ.get("PYTHONPATH")) if p),
            **self.env,
        }
        ray_bin = Path(sys.executable).with_name("ray")
        with open(Path(self.temp_dir) / "head.log", "wb") as log:
            self._proc = subprocess.Popen(
                [str(ray_bin), "start", "--head", "--block", f"--port={port}",
                 f"--autoscaling-config={config_path}", f"--num-cpus={self.head_cpus}", "--num-gpus=0",
                 f"--object-store-memory={self.head_object_store_mb << 20}", "--include-dashboard=false",
                 # not the default ports: another Ray on this machine may hold them
                 f"--dashboard-agent-listen-port={free_port()}", f"--ray-client-server-port={free_port()}",
                 f"--temp-dir={self.temp_dir}", "--disable-usage-stats"],
                env=env, start_new_session=True, stdin=subprocess.DEVNULL, stdout=log,
                stderr=subprocess.STDOUT,
            )
        self._wait_for_gcs(timeout_s)
        return self.address

    def _wait_for_gcs(self, timeout_s: float) -> None:
        from ray._raylet import GcsClient

        deadline = time.monotonic() + timeout_s
        while True:
            if self._proc.poll() is not None:
                raise RuntimeError(
                    f"ray start --head exited with {self._proc.returncode}:\n{self.head_log()}"
                )
            try:
                client = GcsClient(address=self.address)
                if any(info.state == 0 for info in client.get_all_node_info(timeout=5).values()):
                    return  # the head's raylet registered ALIVE
            except Exception:
                if time.monotonic() > deadline:
                    self.shutdown()
                    raise TimeoutError(f"the head's GCS did not answer in {timeout_s:.0f} s") from None
            time.sleep(0.5)

    def head_log(self) -> str:
        path = Path(self.temp_dir or "/nonexistent") / "head.log"
        return path.read_text(errors="replace")[-3000:] if path.exists() else ""

    def shutdown(self, grace_s: float = 10.0) -> None:
        """SIGTERM the head's process group (head, autoscaler, fake worker nodes), then SIGKILL."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            pass
        except ProcessLookupError:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # whatever is left of the group
        proc.wait(timeout=30)
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def alive_nodes() -> list[dict[str, Any]]:
    import ray

    return [n for n in ray.nodes() if n["Alive"]]


def worker_nodes(accelerator: str | None = None, include_gone: bool = False) -> list[dict[str, Any]]:
    """Fake GPU nodes (of ``accelerator`` if given): the alive ones, or with ``include_gone`` also
    those the autoscaler has already terminated (a node idle for ``idle_timeout_minutes`` after
    its last actor may be gone by the time a test looks at where its work ran)."""
    import ray

    nodes = [n for n in (ray.nodes() if include_gone else alive_nodes()) if n["Resources"].get("GPU")]
    if accelerator:
        nodes = [n for n in nodes if n["Resources"].get(f"accelerator_type:{accelerator}")]
    return nodes


def wait_until(predicate, timeout_s: float, interval_s: float = 0.5, what: str = "condition"):
    """``predicate()`` once truthy (``processes.wait_for``, polled every ``interval_s``)."""
    return wait_for(what, predicate, timeout_s, interval_s)
