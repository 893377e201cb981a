"""CpuSampler against real processes: a child that burns a known amount of CPU under a Ray-style title."""

from __future__ import annotations

import subprocess
import sys

import pytest

from engines.bench.cpu_cost import (
    IDLE,
    RAY_OTHER,
    RAY_SYSTEM,
    WORKER_START,
    CpuCost,
    CpuSampler,
    cpu_summary,
    role_of,
)

BURN = (
    "import sys, time\n"
    "while time.process_time() < 0.5: pass\n"  # 0.5 CPU-seconds of its own, however busy the host
    "print('burnt', flush=True)\n"
    "sys.stdin.read()\n"  # then stay alive (idle) until told, so the last sample sees it
)


def _burner(title: str) -> subprocess.Popen:
    return subprocess.Popen(["bash", "-c", f'exec -a "{title}" {sys.executable} -c "$0"', BURN],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)


@pytest.mark.parametrize("title, role", [
    ("ray::ServeReplica:arcface:EmbeddingDeployment", "replica"),
    ("ray::ProxyActor", "proxy"),
    ("ray::ServeController", "serve_controller"),
    ("ray::_MapWorker.submit MapBatches(EmbedActor)", "embed_actors"),
    ("ray::ReadParquet->MapBatches(_with_uid)->MapBatches(decode_table)", "decode"),  # fused: decode
    ("ray::ReadParquet->MapBatches(_with_uid)", "read"),
    ("ray::Write(StagingDatasink)", "write"),
    ("ray::commit_episode", "commit"),
    ("ray::IDLE", "idle_workers"),
    ("ray::SomethingElse", RAY_OTHER),
    ("/venv/lib/python3.11/site-packages/ray/core/src/ray/raylet/raylet --node-id=1", RAY_SYSTEM),
])
def test_roles_come_from_the_process_title(title, role):
    assert role_of(title) == role


def test_the_cpu_a_child_burns_during_the_span_goes_to_its_role():
    sampler = CpuSampler(interval_s=0.05, exclude_self=True).start()
    child = _burner("ray::ProxyActor")
    try:
        assert child.stdout.readline().strip() == "burnt"
        cost = sampler.stop()
    finally:
        child.communicate("", timeout=30)
    # it burnt 0.5 s of its own; /proc counts in 10 ms ticks, and a sample taken before the
    # exec sees bash's title, so allow a few ticks less
    assert cost.cpu_s_by_role.get("proxy", 0.0) >= 0.45
    assert "driver" not in cost.cpu_s_by_role  # exclude_self: the load generator is not the shell


def test_a_worker_that_has_run_nothing_yet_is_starting_not_idle():
    sampler = CpuSampler(interval_s=0.05, exclude_self=True).start()
    child = _burner("ray::IDLE")  # what a Ray worker is called while it boots and loads its first task
    try:
        assert child.stdout.readline().strip() == "burnt"
        cost = sampler.stop()
    finally:
        child.communicate("", timeout=30)
    assert cost.cpu_s_by_role.get(WORKER_START, 0.0) >= 0.45 and IDLE not in cost.cpu_s_by_role
    assert cost.per_face(100)["startup_cpu_s"] >= 0.45


def test_idle_after_a_task_is_idle_and_each_process_starts_once():
    sampler = CpuSampler()
    first, second = (101, 1.0), (102, 2.0)
    assert sampler._role("ray::IDLE", first) == WORKER_START
    assert sampler._role("ray::MapBatches(decode_table)", first) == "decode"
    assert sampler._role("ray::IDLE", first) == IDLE
    assert sampler._role("ray::IDLE", second) == WORKER_START  # another process: its own start
    assert sampler._role("ray::IDLE", (101, 3.0)) == WORKER_START  # a recycled pid is a new process
    assert sampler._role("/path/raylet --node-id=1", second) == RAY_SYSTEM
    assert sampler._role("ray::IDLE", second) == WORKER_START  # a system title is not a task


def test_cpu_spent_before_the_span_is_not_counted():
    child = _burner("ray::ServeReplica:a:b")
    try:
        assert child.stdout.readline().strip() == "burnt"
        with CpuSampler(interval_s=0.05, exclude_self=True) as sampler:
            pass
    finally:
        child.communicate("", timeout=30)
    assert sampler.cost.cpu_s_by_role.get("replica", 0.0) < 0.1  # idle during the span


def test_per_face_figures():
    cost = CpuCost(wall_s=2.0, cpu_s_by_role={"proxy": 1.0, "replica": 3.0})
    out = cost.per_face(1000)
    assert out["cpu_s"] == 4.0 and out["cpu_ms_per_face"] == 4.0
    assert out["cpu_ms_per_face_by_role"] == {"proxy": 1.0, "replica": 3.0}
    assert out["cores_busy"] == 2.0 and out["faces_per_cpu_s"] == 250.0
    assert out["startup_cpu_s"] == 0.0 and out["steady_faces_per_cpu_s"] == 250.0
    assert CpuCost(1.0).per_face(0)["cpu_ms_per_face"] is None


def test_worker_start_is_given_apart_from_the_cost_per_face():
    cost = CpuCost(wall_s=10.0, cpu_s_by_role={WORKER_START: 6.0, "embed_actors": 3.0, "decode": 1.0})
    out = cost.per_face(1000)
    assert out["cpu_ms_per_face"] == 10.0 and out["faces_per_cpu_s"] == 100.0  # all of it
    assert out["startup_cpu_s"] == 6.0
    assert out["steady_cpu_ms_per_face"] == 4.0 and out["steady_faces_per_cpu_s"] == 250.0
    assert cpu_summary(out).endswith(
        "of it 6.0 CPU-s starting workers (fixed per run), 4.000 ms per face without")


def test_the_summary_line_of_a_run_that_embedded_nothing():
    cost = CpuCost(wall_s=2.0, cpu_s_by_role={"driver": 1.5})
    assert cpu_summary(cost.per_face(0)) == "1.5 CPU-seconds, no faces embedded"
    assert cpu_summary(cost.per_face(100)).startswith("15.000 ms per face (driver 15.000)")
