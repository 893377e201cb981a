"""get_or_build_plan: local cache -> S3 -> one build under a lock -> upload.

Real S3 protocol (moto server on 127.0.0.1, boto3 over HTTP), real processes
with their own cache dirs as separate hosts, real file locks. The only seam is
the build step: a callable that writes known bytes instead of running TensorRT.
The GPU facts in the key are an explicit ``BuildTarget`` (a parameter).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
from engine_cache_worker import known_plan_bytes
from moto_s3 import dead_endpoint
from plan_fixtures import TARGET, CountingBuild, trt_config

from engines.config import QuantizationConfig, TensorRTConfig
from engines.drift_gate import conversion_drift
from engines.errors import BackendUnavailable, EngineBuildError
from engines.models import resolve_model
from engines.models.precision import convert_model
from engines.s3 import make_client
from engines.tensorrt.plan_cache import LocalPlanCache, get_or_build_plan
from engines.tensorrt.plan_key import BuildSettings, parse_key, plan_key
from engines.tensorrt.plan_store import S3PlanStore

WORKER = Path(__file__).parents[2] / "helpers" / "engine_cache_worker.py"


def measure(cfg: TensorRTConfig, max_drift: float = 0.001):
    """The pre-build drift check the TensorRT backend passes (``drift_gate.conversion_drift``)."""
    return functools.partial(conversion_drift, max_drift=max_drift, cache_dir=cfg.storage.cache_dir)


def test_key_names_graph_precision_gpu_version_and_profile(mbf_model):
    settings = BuildSettings(precision="fp32", min_batch=1, opt_batch=16, max_batch=64)
    key = plan_key(mbf_model, settings, TARGET)
    major, minor = TARGET.compute_capability
    assert key == (f"synthetic-mobilefacenet-{mbf_model.sha256[:8]}-fp32-sm{major}{minor}-{TARGET.device_tag}"
                   f"-trt{TARGET.trt_version}-cu{TARGET.trt_cuda_major}-b1_16_64.plan")
    fields = parse_key(key)
    assert fields["sha8"] == mbf_model.sha256[:8] and fields["trt"] == TARGET.trt_version
    ampere = plan_key(mbf_model, replace(settings, hardware_compatibility="ampere_plus"), TARGET)
    assert ampere != key and parse_key(ampere)["hc"] == "ampere_plus"
    with pytest.raises(ValueError, match="convert the graph first"):
        plan_key(mbf_model, replace(settings, precision="fp16"), TARGET)
    with pytest.raises(ValueError, match="min <= opt <= max"):
        BuildSettings(min_batch=8, opt_batch=4, max_batch=16)


def test_key_hashes_the_converted_graph_that_is_built(mbf_model, tmp_path):
    cfg = replace(trt_config(tmp_path), precision="fp16")
    build = CountingBuild()
    entry = get_or_build_plan(mbf_model, cfg, target=TARGET, build=build, measure_drift=measure(cfg))
    fp16 = convert_model(mbf_model, "fp16", cache_dir=cfg.storage.cache_dir)
    assert fp16.sha256 != mbf_model.sha256
    assert parse_key(entry.key)["sha8"] == fp16.sha256[:8]
    assert entry.graph.sha256 == fp16.sha256 and entry.graph.precision == "fp16"
    assert entry.sidecar["graph_sha256"] == fp16.sha256
    assert entry.sidecar["source_sha256"] == mbf_model.sha256
    # measured on the CPU before the build, recorded with the plan
    drift = entry.sidecar["build"]["graph_drift"]
    assert drift["graph_sha256"] == fp16.sha256 and drift["source_sha256"] == mbf_model.sha256
    assert drift["passed"] and 0.999 <= drift["min_cosine_sim"] <= drift["mean_cosine_sim"] <= 1.0


@pytest.mark.slow
def test_int8_graph_drift_is_measured_before_its_build_and_recorded(mbf_model, tmp_path, caplog):
    cfg = replace(trt_config(tmp_path), precision="int8")
    order: list[str] = []

    class Build(CountingBuild):
        def __call__(self, job) -> dict:
            drift_files = list((tmp_path / "host" / "models" / "converted").glob("*int8*.drift-*.json"))
            order.append(f"build after {len(drift_files)} drift report(s)")
            return super().__call__(job)

    with caplog.at_level(logging.WARNING, logger="engines.tensorrt.plan_cache"):
        entry = get_or_build_plan(mbf_model, cfg, target=TARGET, build=Build(), measure_drift=measure(cfg),
                                  quantization=QuantizationConfig(keep_fp32="none"))
    assert order == ["build after 1 drift report(s)"]
    drift = entry.sidecar["build"]["graph_drift"]
    assert drift["precision"] == "int8" and drift["max_drift"] == 0.001
    # full int8 (keep_fp32: none) on these networks is far outside the bound (README "int8"): built, warned
    assert not drift["passed"] and "drifts from fp32" in caplog.text


def test_fp32_build_has_no_conversion_drift(mbf_model, tmp_path):
    entry = get_or_build_plan(mbf_model, trt_config(tmp_path), target=TARGET, build=CountingBuild())
    assert "graph_drift" not in entry.sidecar["build"]


def test_local_cache_builds_once_then_hits(mbf_model, tmp_path):
    cfg = trt_config(tmp_path)
    build = CountingBuild()
    first = get_or_build_plan(mbf_model, cfg, target=TARGET, build=build)
    second = get_or_build_plan(mbf_model, cfg, target=TARGET, build=build)
    assert (first.source, second.source) == ("built", "local")
    assert build.keys == [first.key]
    assert second.read_verified() == known_plan_bytes(first.key)
    side = second.sidecar
    assert side["sha256"] == hashlib.sha256(known_plan_bytes(first.key)).hexdigest()
    assert side["gpu_name"] == TARGET.gpu_name and side["tensorrt_version"] == TARGET.trt_version
    assert side["builder_settings"]["max_batch"] == cfg.max_batch_size and side["created_at"]


def test_local_plan_with_wrong_checksum_is_discarded_and_rebuilt(mbf_model, tmp_path, caplog):
    cfg = trt_config(tmp_path)
    build = CountingBuild()
    entry = get_or_build_plan(mbf_model, cfg, target=TARGET, build=build)
    entry.path.write_bytes(b"tampered plan")
    assert LocalPlanCache.for_storage(cfg.storage).get(entry.key) is None
    with caplog.at_level(logging.WARNING, logger="engines.tensorrt.plan_cache"):
        again = get_or_build_plan(mbf_model, cfg, target=TARGET, build=build)
    assert again.source == "built" and len(build.keys) == 2
    assert again.read_verified() == known_plan_bytes(entry.key)
    assert "discarding cached engine" in caplog.text


def test_no_engine_and_no_local_build_is_unavailable(mbf_model, tmp_path, s3_endpoint, bucket):
    build = CountingBuild()
    local_only = trt_config(tmp_path, build_locally=False)
    with pytest.raises(BackendUnavailable, match="build_locally is false"):
        get_or_build_plan(mbf_model, local_only, target=TARGET, build=build)
    shared = trt_config(tmp_path, "h2", s3_endpoint, bucket, build_locally=False)
    with pytest.raises(BackendUnavailable, match=f"s3://{bucket}/engines"):
        get_or_build_plan(mbf_model, shared, target=TARGET, build=build)
    assert build.keys == []


def test_round_trip_through_s3_between_two_hosts(mbf_model, tmp_path, s3_endpoint, bucket):
    build = CountingBuild()
    built = get_or_build_plan(mbf_model, trt_config(tmp_path, "a", s3_endpoint, bucket),
                                target=TARGET, build=build)
    # host b never builds: it may not, and it does not need to
    fetched = get_or_build_plan(mbf_model, trt_config(tmp_path, "b", s3_endpoint, bucket,
                                                        build_locally=False), target=TARGET, build=build)
    assert (built.source, fetched.source) == ("built", "s3")
    assert fetched.read_verified() == built.read_verified() == known_plan_bytes(built.key)
    assert fetched.sidecar == built.sidecar
    assert build.keys == [built.key]
    store = S3PlanStore(make_client(s3_endpoint), bucket, "engines")
    assert [e["key"] for e in store.list()] == [built.key]
    assert store.lock_state(built.key, 60) is None  # the builder released its lock


def test_corrupt_engine_in_s3_is_never_loaded_but_rebuilt(mbf_model, tmp_path, s3_endpoint, bucket,
                                                           caplog):
    build = CountingBuild()
    good = get_or_build_plan(mbf_model, trt_config(tmp_path, "a", s3_endpoint, bucket),
                               target=TARGET, build=build)
    store = S3PlanStore(make_client(s3_endpoint), bucket, "engines")
    make_client(s3_endpoint).put_object(Bucket=bucket, Key=store.uri(good.key).key, Body=b"corrupt!")
    with caplog.at_level(logging.WARNING):
        entry = get_or_build_plan(mbf_model, trt_config(tmp_path, "b", s3_endpoint, bucket),
                                    target=TARGET, build=build)
    assert entry.source == "built" and len(build.keys) == 2
    assert entry.read_verified() == known_plan_bytes(good.key)
    assert "checksum mismatch" in caplog.text
    republished = tmp_path / "check.plan"
    store.download(good.key, republished, store.sidecar(good.key)["sha256"])  # S3 is healed
    assert republished.read_bytes() == known_plan_bytes(good.key)


def test_waiter_skips_a_corrupt_copy_until_the_lock_holder_republishes(mbf_model, tmp_path, s3_endpoint,
                                                                      bucket):
    import threading

    build = CountingBuild()
    good = get_or_build_plan(mbf_model, trt_config(tmp_path, "a", s3_endpoint, bucket),
                               target=TARGET, build=build)
    store = S3PlanStore(make_client(s3_endpoint), bucket, "engines")
    make_client(s3_endpoint).put_object(Bucket=bucket, Key=store.uri(good.key).key, Body=b"corrupt!")
    holder = store.try_lock(good.key, ttl_s=600)  # host x is rebuilding it
    result = {}
    waiter = threading.Thread(target=lambda: result.update(entry=get_or_build_plan(
        mbf_model, trt_config(tmp_path, "c", s3_endpoint, bucket), target=TARGET, build=build,
        poll_interval_s=0.1)))
    waiter.start()
    time.sleep(1.0)
    assert waiter.is_alive() and "entry" not in result  # it neither loaded nor built the bad copy
    store.upload(good.key, good.path, good.sidecar)  # host x republishes: same sha, new object
    store.release(holder)
    waiter.join(timeout=30)
    assert result["entry"].source == "s3" and len(build.keys) == 1
    assert result["entry"].read_verified() == known_plan_bytes(good.key)


def test_unreachable_s3_builds_locally_with_a_warning(mbf_model, tmp_path, caplog, aws_env):
    build = CountingBuild()
    cfg = trt_config(tmp_path, "a", dead_endpoint(), "engines-bucket")
    started = time.perf_counter()
    with caplog.at_level(logging.WARNING, logger="engines.tensorrt.plan_cache"):
        entry = get_or_build_plan(mbf_model, cfg, target=TARGET, build=build)
    assert entry.source == "built" and build.keys == [entry.key]
    assert "engine store unreachable" in caplog.text
    assert time.perf_counter() - started < 20  # one probe, no minutes of retries


def test_waiting_host_gives_up_after_wait_timeout(mbf_model, tmp_path, s3_endpoint, bucket):
    cfg = trt_config(tmp_path, "a", s3_endpoint, bucket, wait_timeout_s=1.0)
    store = S3PlanStore(make_client(s3_endpoint), bucket, "engines")
    the_key = plan_key(mbf_model, BuildSettings.from_config(cfg), TARGET)
    assert store.try_lock(the_key, ttl_s=600) is not None  # a live builder elsewhere
    build = CountingBuild()
    with pytest.raises(EngineBuildError, match="waited 1 s"):
        get_or_build_plan(mbf_model, cfg, target=TARGET, build=build, poll_interval_s=0.2)
    assert build.keys == []


def _start_workers(specs: list[dict], tmp_path: Path) -> list[subprocess.Popen]:
    procs = []
    for i, spec in enumerate(specs):
        spec = {**spec, "ready": str(tmp_path / f"ready-{i}"), "go": str(tmp_path / "go")}
        procs.append(subprocess.Popen([sys.executable, str(WORKER), json.dumps(spec)],
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    deadline = time.monotonic() + 120
    while not all((tmp_path / f"ready-{i}").exists() for i in range(len(specs))):
        if any(p.poll() is not None for p in procs) or time.monotonic() > deadline:
            for p in procs:
                p.kill()
            raise AssertionError("a worker died before the start line:\n"
                                 + "\n".join(p.communicate()[1][-2000:] for p in procs))
        time.sleep(0.05)
    (tmp_path / "go").touch()
    return procs


@pytest.mark.slow
def test_eight_processes_on_four_hosts_build_once_and_share_the_bytes(mbf_model, tmp_path, s3_endpoint,
                                                                     bucket):
    log = tmp_path / "builds.log"
    specs = [{"name": f"p{i}", "model_path": mbf_model.path, "bucket": bucket, "endpoint": s3_endpoint,
              "cache_dir": str(tmp_path / f"host{i % 4}"), "log": str(log), "build_s": 1.5}
             for i in range(8)]
    procs = _start_workers(specs, tmp_path)
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=180)
        assert proc.returncode == 0, err[-3000:]
        results.append(json.loads(out.strip().splitlines()[-1]))
    builds = log.read_text().splitlines()
    assert len(builds) == 1, builds
    key = results[0]["key"]
    expected = hashlib.sha256(known_plan_bytes(key)).hexdigest()
    assert {r["sha256"] for r in results} == {expected}
    sources = sorted(r["source"] for r in results)
    assert sources.count("built") == 1 and set(sources) <= {"built", "s3", "local"}
    assert sources.count("s3") >= 3  # every other host fetched it


@pytest.mark.slow
def test_crashed_builder_lock_expires_and_another_host_builds(mbf_model, tmp_path, s3_endpoint, bucket,
                                                              caplog):
    log = tmp_path / "builds.log"
    ttl = 2.0
    crash = {"name": "crasher", "model_path": mbf_model.path, "bucket": bucket, "endpoint": s3_endpoint,
             "cache_dir": str(tmp_path / "host-a"), "log": str(log), "crash": True, "ttl": ttl}
    (proc,) = _start_workers([crash], tmp_path)
    proc.communicate(timeout=120)
    assert proc.returncode == 3 and log.read_text().startswith("crasher ")
    cfg = trt_config(tmp_path, "host-b", s3_endpoint, bucket, lock_ttl_s=ttl)
    model = resolve_model(mbf_model.path)  # as the worker names it (by path)
    key = plan_key(model, BuildSettings.from_config(cfg), TARGET)
    store = S3PlanStore(make_client(s3_endpoint), bucket, "engines")
    assert store.lock_state(key, ttl) is not None  # the dead builder's lock is still there
    build = CountingBuild()
    with caplog.at_level(logging.WARNING, logger="engines.tensorrt.plan_cache"):
        entry = get_or_build_plan(model, cfg, target=TARGET, build=build, poll_interval_s=0.2)
    assert entry.source == "built" and build.keys == [key]
    assert "taking over" in caplog.text
    assert store.sidecar(key)["sha256"] == hashlib.sha256(known_plan_bytes(key)).hexdigest()
    assert store.lock_state(key, ttl) is None
