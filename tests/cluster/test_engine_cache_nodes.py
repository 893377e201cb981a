"""Many GPU actors on several nodes of one architecture cause exactly one engine build.

Six ``EngineResolver`` actors (tests/helpers/engine_resolver.py) start at once: four on two fake
A10G nodes (sm86), two on one fake A100 node (sm80), each with its node's own local
cache and the S3 engine cache (a real S3 API: moto's server on 127.0.0.1) configured
through the environment, as the cluster configs in cluster/ set it. The engine cache's
promise: one build per engine key across the cluster, everyone else downloads it
(another node) or finds it on disk (same node), and all load the same verified bytes.
"""

from __future__ import annotations

import hashlib
from collections import Counter

import pytest
from engine_resolver import EngineResolver, plan_bytes

from engines.models.precision import convert_model
from engines.s3 import make_client
from engines.tensorrt.plan_key import parse_key
from engines.tensorrt.plan_store import S3PlanStore

pytestmark = pytest.mark.integration

MODEL = "synthetic:mobilefacenet"
PER_ARCH = {"A10G": 4, "A100": 2}  # 0.5 GPU each: 2 per one-GPU node -> 2 A10G nodes, 1 A100 node


def test_one_build_per_gpu_architecture_across_nodes(fake_cluster, mbf_model, s3_endpoint, bucket, tmp_path):
    import ray

    env = {  # what cluster/aws-gpu.yaml and the KubeRay manifests put in the nodes' environment
        "ARCFACE_TENSORRT__STORAGE__TYPE": "s3",
        "ARCFACE_TENSORRT__STORAGE__BUCKET": bucket,
        "ARCFACE_TENSORRT__STORAGE__PREFIX": "arcface/engines",
        "ARCFACE_TENSORRT__STORAGE__ENDPOINT_URL": s3_endpoint,
    }
    log = tmp_path / "builds.log"
    log.touch()
    resolver = ray.remote(EngineResolver)
    actors = [
        resolver.options(num_cpus=0, num_gpus=0.5, accelerator_type=arch, runtime_env={"env_vars": env})
        .remote(MODEL, str(tmp_path / "hosts"), str(log))
        for arch, n in PER_ARCH.items() for _ in range(n)
    ]
    try:
        placed = ray.get([a.where.remote() for a in actors], timeout=240)  # nodes launched, actors up
        nodes = {arch: {p["node_id"] for p in placed if p["accelerator"] == arch} for arch in PER_ARCH}
        assert {arch: len(ids) for arch, ids in nodes.items()} == {"A10G": 2, "A100": 1}, placed
        assert all(p["cuda_visible_devices"] for p in placed)  # Ray gave each its (fake) GPU
        # every actor is up before any resolves: they race for the same keys
        results = ray.get([a.resolve.remote() for a in actors], timeout=300)
        builds = log.read_text().splitlines()

        by_arch = {arch: [r for r in results if r["accelerator"] == arch] for arch in PER_ARCH}
        print(f"\nengine builds: {len(builds)} for {len(results)} actors on "
              f"{sum(len(v) for v in nodes.values())} nodes")
        for arch, rows in by_arch.items():
            print(f"  {arch}: key {rows[0]['key']}; sources "
                  f"{sorted((r['node_id'][-5:], r['source']) for r in rows)}")
        for line in builds:
            print(f"  build: {line}")

        assert {r["storage"]["type"] for r in results} == {"s3"}
        assert len(builds) == len(PER_ARCH), builds  # exactly one build per architecture
        keys = {arch: {r["key"] for r in rows} for arch, rows in by_arch.items()}
        assert all(len(k) == 1 for k in keys.values()), keys  # every host computed the same key
        key = {arch: next(iter(k)) for arch, k in keys.items()}
        assert (parse_key(key["A10G"])["sm"], parse_key(key["A100"])["sm"]) == ("86", "80")
        assert sorted(line.split()[2] for line in builds) == sorted(key.values())
        graph = convert_model(mbf_model, parse_key(key["A10G"])["precision"], cache_dir=tmp_path / "driver")
        for arch, rows in by_arch.items():
            sources = Counter(r["source"] for r in rows)
            assert sources["built"] == 1, (arch, sources)
            if len(nodes[arch]) > 1:
                assert sources["s3"] >= 1, (arch, sources)  # another node fetched it from S3
            assert sources["built"] + sources["s3"] + sources["local"] == PER_ARCH[arch]
            expected = hashlib.sha256(plan_bytes(key[arch], graph.path)).hexdigest()
            assert {r["sha256"] for r in rows} == {expected}  # the builder's bytes, verified, everywhere
        store = S3PlanStore(make_client(s3_endpoint), bucket, "arcface/engines")
        published = {e["key"] for e in store.list()}
        assert published == set(key.values())
        assert all(store.lock_state(k, 60) is None for k in published)  # builders released their locks
    finally:
        for actor in actors:
            ray.kill(actor)  # their GPUs go back to the pool, their nodes idle out
