"""Shared fixtures. Environment for Ray is set here, before anything imports it."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("TQDM_DISABLE", "1")
# Ray Data's resource reservations (data_jobs.job.RESERVATION_EXPIRY_S: 30 s for the job's
# drivers), shorter here and renewed every 3 s instead of 10: a driver a test kills leaves its
# reservation for 10 s, not the 180 s that left the next run idle for three minutes. Set before
# this process (and the drivers it starts) imports Ray Data.
os.environ.setdefault("RAY_DATA_AUTOSCALING_REQUEST_EXPIRE_TIME_S", "10")
os.environ.setdefault("RAY_DATA_MIN_GAP_BETWEEN_AUTOSCALING_REQUESTS", "3")
# Credentials for the S3 server the tests start on 127.0.0.1 (moto accepts any);
# set before Ray starts so its workers inherit them.
os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")

import numpy as np
import pytest
from moto_s3 import aws_env, bucket, s3_endpoint  # noqa: F401  (fixtures: the real S3 API server)
from support import free_port, init_local_ray

from engines.models import ResolvedModel, resolve_model
from engines.models.sample_faces import FaceSet, jittered_faces


def pytest_collection_modifyitems(config, items):
    """Tests on the simulated multi-node cluster run last; GPU tests skip cleanly where
    there is no CUDA device or no GPU extra."""
    from engines.hardware import has_cuda

    # Stable sort: they take this process's Ray connection for a while (see
    # support.ray_connection_suspended), so no test that shares the local Ray follows them.
    items.sort(key=lambda item: "fake_cluster" in getattr(item, "fixturenames", ()))
    if has_cuda():
        return
    skip = pytest.mark.skip(reason="no CUDA device on this host")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


UNMARKED_BUDGET_S = 5.0  # an unmarked test (the quick loop's) slower than this is reported
_seconds: dict[str, float] = {}
_over_budget: list[tuple[float, str]] = []


def pytest_runtest_logreport(report):
    """Add up each test's setup, call and teardown; note every test outside ``integration`` and
    ``slow`` that took over ``UNMARKED_BUDGET_S`` in all: the quick loop stays quick only if new
    slow tests get marked or made fast. (With xdist this runs on the controller too, which gets
    every worker's reports.)"""
    _seconds[report.nodeid] = _seconds.get(report.nodeid, 0.0) + report.duration
    if report.when != "teardown":
        return
    total = _seconds.pop(report.nodeid)
    if total > UNMARKED_BUDGET_S and not {"integration", "slow"} & set(report.keywords):
        _over_budget.append((total, report.nodeid))


def pytest_terminal_summary(terminalreporter):
    if _over_budget:
        terminalreporter.section(f"unmarked tests over {UNMARKED_BUDGET_S:g} s: mark them or make them fast")
        for seconds, nodeid in sorted(_over_budget, reverse=True):
            terminalreporter.write_line(f"{seconds:6.1f}s {nodeid}")


@pytest.fixture(scope="session")
def ray_local():
    """One real local Ray for the session: 2 CPUs, no dashboard, small object store.

    Yields the Prometheus metrics port of the node (metrics flushed every second).
    """
    import ray

    metrics_port = free_port()
    init_local_ray(metrics_port)
    yield metrics_port
    if not ray.is_initialized():  # the fake cluster's tests ran last and left no local Ray
        return
    try:
        from ray import serve

        serve.shutdown()
    finally:
        ray.shutdown()


@pytest.fixture(scope="session")
def mbf_model() -> ResolvedModel:
    return resolve_model("synthetic:mobilefacenet")


@pytest.fixture(scope="session")
def int8_cache(tmp_path_factory) -> Path:
    """One cache for the suite's mixed-int8 graphs of ``mbf_model``: the sensitivity search is
    the slowest conversion there is, and the engine tests (openvino) and the recipe tests
    (models/test_int8.py) ask for the same graph; whichever runs first searches once."""
    return tmp_path_factory.mktemp("int8-cache")


@pytest.fixture(scope="session")
def r50_model() -> ResolvedModel:
    return resolve_model("synthetic:iresnet50")


@pytest.fixture(scope="session")
def face_set() -> FaceSet:
    return jittered_faces(21, seed=5)


@pytest.fixture(scope="session")
def faces(face_set: FaceSet) -> np.ndarray:
    return face_set.faces
