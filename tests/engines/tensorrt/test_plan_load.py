"""A verified plan that TensorRT refuses: quarantined and rebuilt once, or kept when the host is to blame;
and a cached plan whose sidecar names another host is rebuilt, never loaded.

The build step writes numbered bytes (``CountingBuild(numbered=True)``); the load step stands for
TensorRT's deserialise, which needs a GPU: it refuses the builds it is told to, with the cause
``TrtRunner`` derives from TensorRT's log (``runner.classify_load_failure``, tested on its own).
"""

from __future__ import annotations

import json
import logging
from dataclasses import replace

import pytest
from plan_fixtures import TARGET, CountingBuild, build_number, trt_config

from engines.errors import BackendUnavailable, EngineBuildError, PlanLoadError
from engines.s3 import make_client
from engines.tensorrt.plan_cache import LocalPlanCache, get_or_build_plan, load_with_one_rebuild
from engines.tensorrt.plan_store import S3PlanStore

INCOMPATIBLE = ["[ERROR] IRuntime::deserializeCudaEngine: Error Code 1: Serialization (Serialization "
                "assertion plan->header.magicTag == rt::kPLAN_MAGIC_TAG failed.)"]
OUT_OF_MEMORY = ["[ERROR] [defaultAllocator.cpp::allocate] Error Code 1: Cuda Runtime (out of memory)"]


class RefusingLoad:
    """Loads (reads, verified) every plan but those of the builds in ``refuse``."""

    def __init__(self, refuse: set[int], seen: list[str], cause: str) -> None:
        self.refuse, self.seen, self.cause = refuse, seen, cause
        self.loaded: list[int] = []

    def __call__(self, entry) -> int:
        number = build_number(entry.read_verified())
        if number in self.refuse:
            raise PlanLoadError(f"TensorRT could not deserialize {entry.path}", cause=self.cause,
                                seen=self.seen)
        self.loaded.append(number)
        return number


def _resolver(model, cfg, build):
    return lambda rebuild: get_or_build_plan(model, cfg, target=TARGET, build=build, rebuild=rebuild)


def test_a_refused_plan_is_quarantined_with_what_tensorrt_said_and_rebuilt_once(mbf_model, tmp_path, caplog):
    cfg, build = trt_config(tmp_path), CountingBuild(numbered=True)
    local = LocalPlanCache.for_storage(cfg.storage)
    load = RefusingLoad({1}, INCOMPATIBLE, "incompatible")
    with caplog.at_level(logging.WARNING, logger="engines.tensorrt.plan_cache"):
        entry, loaded = load_with_one_rebuild(_resolver(mbf_model, cfg, build), load, local)
    assert loaded == 2 and entry.source == "built" and len(build.keys) == 2
    (quarantined,) = (local.root / "quarantine").iterdir()
    assert build_number((quarantined / entry.key).read_bytes()) == 1
    reason = json.loads((quarantined / "reason.json").read_text())
    assert reason["key"] == entry.key and reason["tensorrt_said"] == INCOMPATIBLE
    assert "quarantined engine" in caplog.text and "rebuilding it once" in caplog.text
    # the rebuilt plan is the cached one from now on; the quarantined copy is never read again
    again, loaded = load_with_one_rebuild(_resolver(mbf_model, cfg, build), load, local)
    assert (again.source, loaded, len(build.keys)) == ("local", 2, 2)


def test_a_plan_refused_twice_is_an_error_naming_both_and_no_loop(mbf_model, tmp_path):
    cfg, build = trt_config(tmp_path), CountingBuild(numbered=True)
    load = RefusingLoad({1, 2, 3}, INCOMPATIBLE, "unknown")
    with pytest.raises(EngineBuildError, match="even rebuilt on this host") as info:
        load_with_one_rebuild(_resolver(mbf_model, cfg, build), load, LocalPlanCache.for_storage(cfg.storage))
    assert len(build.keys) == 2 and "the first copy (built) failed" in str(info.value)


def test_out_of_device_memory_keeps_the_plan_and_says_so(mbf_model, tmp_path):
    cfg, build = trt_config(tmp_path), CountingBuild(numbered=True)
    local = LocalPlanCache.for_storage(cfg.storage)
    load = RefusingLoad({1}, OUT_OF_MEMORY, "out_of_memory")
    with pytest.raises(BackendUnavailable, match="out_of_memory; the plan was kept"):
        load_with_one_rebuild(_resolver(mbf_model, cfg, build), load, local)
    assert len(build.keys) == 1 and not (local.root / "quarantine").exists()
    assert local.get(build.keys[0]) is not None  # still cached: the next start with more memory uses it


def test_the_rebuild_after_a_quarantine_leaves_the_s3_copy_alone(mbf_model, tmp_path, s3_endpoint, bucket):
    build = CountingBuild(numbered=True)
    published = get_or_build_plan(mbf_model, trt_config(tmp_path, "a", s3_endpoint, bucket), target=TARGET,
                                  build=build)
    cfg_b = trt_config(tmp_path, "b", s3_endpoint, bucket)
    load = RefusingLoad({1}, INCOMPATIBLE, "incompatible")
    entry, loaded = load_with_one_rebuild(_resolver(mbf_model, cfg_b, build), load,
                                          LocalPlanCache.for_storage(cfg_b.storage))
    assert loaded == 2 and entry.source == "built"
    store = S3PlanStore(make_client(s3_endpoint), bucket, "engines")
    assert store.sidecar(published.key)["sha256"] == published.sidecar["sha256"]  # other hosts may load it


def test_a_cached_plan_whose_sidecar_names_another_device_is_rebuilt(mbf_model, tmp_path, caplog):
    cfg, build = trt_config(tmp_path), CountingBuild(numbered=True)
    entry = get_or_build_plan(mbf_model, cfg, target=TARGET, build=build)
    local = LocalPlanCache.for_storage(cfg.storage)
    local.write_sidecar(entry.key, {**entry.sidecar, "gpu_name": "NVIDIA H200"})  # bytes still verify
    with caplog.at_level(logging.WARNING, logger="engines.tensorrt.plan_cache"):
        again = get_or_build_plan(mbf_model, cfg, target=TARGET, build=build)
    assert again.source == "built" and len(build.keys) == 2
    assert "NVIDIA H200" in caplog.text and again.sidecar["gpu_name"] == TARGET.gpu_name


def test_an_s3_plan_built_by_another_tensorrt_build_is_not_downloaded(mbf_model, tmp_path, s3_endpoint,
                                                                      bucket, caplog):
    build = CountingBuild(numbered=True)
    cu12 = replace(TARGET, trt_cuda_major=12)
    a = get_or_build_plan(mbf_model, trt_config(tmp_path, "a", s3_endpoint, bucket), target=cu12,
                          build=build)
    store = S3PlanStore(make_client(s3_endpoint), bucket, "engines")
    cu13 = replace(TARGET, trt_cuda_major=13)
    # a mislabelled upload: the cu13 key, but a sidecar (and bytes) from the cu12 build
    mislabelled = a.key.replace("-cu12-", "-cu13-")
    store.upload(mislabelled, a.path, {**a.sidecar, "key": mislabelled})
    with caplog.at_level(logging.WARNING, logger="engines.tensorrt.plan_cache"):
        b = get_or_build_plan(mbf_model, trt_config(tmp_path, "b", s3_endpoint, bucket), target=cu13,
                              build=build)
    assert b.key == mislabelled and b.source == "built" and len(build.keys) == 2
    assert "CUDA 12" in caplog.text
    assert store.sidecar(mislabelled)["tensorrt_cuda_major"] == 13  # the lock holder replaced it
