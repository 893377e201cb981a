"""The episode job spreads its actor pool over several GPU nodes the autoscaler adds.

``run_job`` on the simulated cluster with two ``EmbedActor``s of one A10G GPU each
(``actor_accelerator_type``): the nodes have one GPU apiece and the head none, so the
pool needs two fake A10G nodes, which the autoscaler launches. Each actor traces
(``placement_log_dir``, the job's placement audit) the rows it embedded and its Ray node; the output must hold
every row once, with the vectors the same engine gives in this process.
"""

from __future__ import annotations

import json
from collections import Counter

import cv2
import numpy as np
import pyarrow.dataset as pads
import pytest
from fake_cluster import worker_nodes

from data_jobs.job import JobSpec, run_job
from data_jobs.sample import make_sample_episodes
from data_jobs.settings import load_job_settings
from engines import get_engine

pytestmark = pytest.mark.integration

MODEL = "synthetic:mobilefacenet"


@pytest.fixture
def wait_for_whole_pool():
    """Ray Data starts dispatching as soon as one actor is up; on an autoscaling cluster the
    second node is seconds behind, so the first actor could take every block of this small
    job. Waiting for the pool's min size makes the spread a property of the scheduling."""
    import ray

    ctx = ray.data.DataContext.get_current()
    before = ctx.wait_for_min_actors_s
    ctx.wait_for_min_actors_s = 180
    yield
    ctx.wait_for_min_actors_s = before


def test_episode_job_actor_pool_spans_gpu_nodes(fake_cluster, wait_for_whole_pool, tmp_path):
    sample = make_sample_episodes(tmp_path / "data", episodes=2, tracks=3, frames=6, corrupt=1)
    out, trace = tmp_path / "out", tmp_path / "trace"
    settings = load_job_settings(
        actors_min=2, actors_max=2, actor_num_gpus=1, actor_accelerator_type="A10G", actor_num_cpus=0.5,
        batch_size=4, decode_batch_size=4, placement_log_dir=str(trace),
    )
    # A GPU cluster's settings (TensorRT first); the fake GPUs make every actor fall back to onnx.
    spec = JobSpec(input=sample.directory, output=str(out), backend="tensorrt", model=MODEL,
                   settings=settings)
    report = run_job(spec)
    assert (report.faces, report.failures, report.episodes_committed) == (sample.decodable, sample.corrupt, 2)

    lines = [json.loads(line) for f in sorted(trace.glob("*.jsonl")) for line in f.read_text().splitlines()]
    rows_per_node = Counter()
    for line in lines:
        rows_per_node[line["node_id"]] += len(line["uids"])
    nodes = {n["NodeID"]: n for n in worker_nodes("A10G", include_gone=True)}
    print(f"\nrows embedded per node: {dict(rows_per_node)}; actors (node, pid): "
          f"{sorted({(line['node_id'][-5:], line['pid']) for line in lines})}")
    assert len(rows_per_node) >= 2, f"one node embedded everything: {dict(rows_per_node)}"
    assert all(rows_per_node.values())
    # a node of the inventory, or (once the autoscaler removed it after the job, when Ray lists
    # it without resources) one where Ray reserved an A10G for the actor, as its trace records
    a10g = {line["node_id"] for line in lines if line["resources"].get("accelerator_type:A10G")}
    assert all(node in nodes or node in a10g for node in rows_per_node), \
        "an actor ran on a node without an A10G"
    assert all(line["resources"].get("GPU") == 1 for line in lines), lines[0]["resources"]
    assert {(line["backend"], line["device"]) for line in lines} == {("onnx", "cpu")}
    traced = [uid for line in lines for uid in line["uids"]]
    assert len(traced) == sample.decodable  # no row twice (no actor died here)

    rows = pads.dataset(out / "embeddings", format="parquet", partitioning="hive").to_table()
    uids = [f"{e}/{t}/{f}" for e, t, f in zip(rows["episode_id"].to_pylist(), rows["track_id"].to_pylist(),
                                                rows["frame"].to_pylist(), strict=True)]
    assert sorted(uids) == sorted(traced)
    # the same vectors as one engine in one process, i.e. as a single-node run
    engine = get_engine("onnx", MODEL)
    crops = np.stack([cv2.imread(f"{sample.directory}/{uid}.jpg") for uid in uids])
    expected, expected_norms = engine.encode_with_norms(crops)
    got = rows["embedding"].combine_chunks().flatten().to_numpy().reshape(-1, 512)
    assert (got * expected).sum(1).min() >= 0.99999
    np.testing.assert_allclose(rows["norm"].to_numpy(), expected_norms, rtol=1e-4)
