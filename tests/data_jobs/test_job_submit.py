"""``ray job submit`` path: a real head node, JobSubmissionClient, working_dir runtime env."""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.dataset as pads
import pytest
from support import free_port

from data_jobs.sample import make_sample_episodes

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]


@dataclass
class HeadNode:
    client: Any  # JobSubmissionClient with the cluster's token
    address: str  # the dashboard's HTTP address


@pytest.fixture()
def head_node():
    """``ray start --head --block`` on 127.0.0.1 in its own temp dir, with token authentication
    on (what new clusters default to; the test session itself runs with it off), and a
    JobSubmissionClient that presents the token; stopped by signalling it
    (``ray stop`` would also stop the test session's other Ray cluster). Its dashboard agent
    and Ray client server get free ports: the defaults (52365, 10001) are taken while the
    session's local Ray runs, and an agent that cannot bind never registers, so every
    submission would be refused with "No available agent"."""
    temp_dir = tempfile.mkdtemp(prefix="rh", dir="/tmp")  # short: Ray's socket paths have a length limit
    gcs, dashboard = free_port(), free_port()
    ray_bin = Path(sys.executable).with_name("ray")
    token = secrets.token_hex(32)
    env = {**os.environ, "RAY_ADDRESS": "", "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token}
    proc = subprocess.Popen(
        [str(ray_bin), "start", "--head", "--block", f"--port={gcs}", "--node-ip-address=127.0.0.1",
         "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
         f"--dashboard-agent-listen-port={free_port()}", f"--ray-client-server-port={free_port()}",
         "--num-cpus=2", f"--temp-dir={temp_dir}", "--disable-usage-stats"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, start_new_session=True,
    )
    address = f"http://127.0.0.1:{dashboard}"
    from ray.job_submission import JobSubmissionClient

    deadline = time.monotonic() + 120
    client = None
    while time.monotonic() < deadline:
        try:
            client = JobSubmissionClient(address, headers={"Authorization": f"Bearer {token}"})
            client.list_jobs()
            break
        except Exception:
            client = None
            time.sleep(1)
    if client is None:
        os.killpg(proc.pid, signal.SIGTERM)
        pytest.fail("the Ray head node's dashboard did not come up")
    yield HeadNode(client, address)
    _stop_head(proc, temp_dir)


def _stop_head(proc: subprocess.Popen, temp_dir: str) -> None:
    """SIGTERM, a few seconds for a clean exit, then SIGKILL of its process group and of any
    process of this head (its temp dir is in every Ray process's command line) that left the
    group. A graceful ``ray start --block`` shutdown takes half a minute on 2 cores; nothing of
    this throwaway cluster needs it."""
    import psutil

    os.killpg(proc.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=5)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    for p in psutil.process_iter(["cmdline"]):
        if any(temp_dir in part for part in p.info["cmdline"] or ()):
            with contextlib.suppress(psutil.Error):
                p.kill()


def _submit_when_an_agent_is_up(client, timeout_s: float = 120.0, **job) -> str:
    """The dashboard answers before the node's job agent has registered with it; until then
    ``submit_job`` is refused with "No available agent" (HTTP 500). Ray's CLI users see the
    same and retry, so the test does too, but only for that one refusal."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return client.submit_job(**job)
        except RuntimeError as exc:
            if "No available agent" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(1)


def test_job_submission_client_runs_the_episode_job(head_node, tmp_path):
    """Submitted with the cluster's token, the job's driver joins the token-auth cluster on its
    own (it inherits the credentials) and runs to the end; without the token, nothing runs."""
    import requests
    from ray.job_submission import JobStatus

    refused = requests.get(f"{head_node.address}/api/jobs/", timeout=30)
    assert refused.status_code == 401, refused.text
    wrong = requests.get(f"{head_node.address}/api/jobs/", timeout=30,
                         headers={"Authorization": "Bearer " + "0" * 64})
    assert wrong.status_code == 403, wrong.text

    sample = make_sample_episodes(tmp_path / "data", episodes=2, tracks=2, frames=3, corrupt=1)
    out = tmp_path / "out"
    entrypoint = (
        f"{sys.executable} -m data_jobs.embed_episodes --input {sample.directory} --output {out} "
        "--backend onnx --model synthetic:mobilefacenet --json"
    )
    job_id = _submit_when_an_agent_is_up(
        head_node.client,
        entrypoint=entrypoint,
        runtime_env={"working_dir": str(REPO), "env_vars": {"RAY_DATA_DISABLE_PROGRESS_BARS": "1"}},
    )
    deadline = time.monotonic() + 420
    status = head_node.client.get_job_status(job_id)
    while status not in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
        assert time.monotonic() < deadline, f"job still {status}"
        time.sleep(2)
        status = head_node.client.get_job_status(job_id)
    logs = head_node.client.get_job_logs(job_id)
    assert status == JobStatus.SUCCEEDED, logs[-3000:]
    assert '"faces": 12' in logs and '"failures": 1' in logs
    rows = pads.dataset(out / "embeddings", format="parquet", partitioning="hive").to_table()
    assert rows.num_rows == sample.decodable
