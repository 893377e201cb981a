"""One simulated multi-node autoscaling cluster for the scale tests (see tests/helpers/fake_cluster.py).

Node types, like the cluster launcher's (cluster/aws-gpu.yaml): a CPU head, and fake
one-GPU workers of two architectures, A10G (sm86, up to 3 nodes) and A100 (sm80, 1).
Each fake node is a real raylet with 1 CPU: keep tests small, the machine has 2 cores.
"""

from __future__ import annotations

import pytest
from fake_cluster import FAST_SERVE_METRICS, FakeAutoscalingCluster, gpu_node_type
from support import ray_connection_suspended


@pytest.fixture(scope="session")
def fake_cluster():
    """The cluster, with this process connected to it as the driver."""
    import ray

    cluster = FakeAutoscalingCluster(
        worker_node_types={
            "gpu_a10g": gpu_node_type("A10G", max_workers=3),
            "gpu_a100": gpu_node_type("A100", max_workers=1),
        },
        max_workers=4,
        idle_timeout_minutes=0.1,  # 6 s: nodes go away soon after their last actor
        env=FAST_SERVE_METRICS,
    )
    # not restored: a session fixture ends with the session, and tests/conftest.py runs these
    # tests last, so no test on the session's Ray follows (a restart only to shut it down)
    with ray_connection_suspended(restore=False):
        cluster.start()
        try:
            ray.init(address=cluster.address, namespace="arcface-cluster-tests", log_to_driver=False)
            yield cluster
        finally:
            try:
                from ray import serve

                serve.shutdown()
            finally:
                ray.shutdown()
                cluster.shutdown()
