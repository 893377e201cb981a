"""A real Serve instance on the session's local Ray, with HTTP and gRPC on free ports, started
the way ``arcface serve`` starts it (our proxy hooks, the gRPC message limit)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from support import free_port

from serve_app.launch import controller_options, load_serve_config
from serve_app.proxy_hooks import GRPC_SERVICER


@dataclass(frozen=True)
class ServeEndpoints:
    http: str
    grpc: str
    metrics_port: int


@pytest.fixture(scope="package")
def serve_endpoints(ray_local) -> ServeEndpoints:
    """Serve for this package's tests, shut down when they are done: an idle Serve (controller,
    proxy, HAProxy) still costs a fifth of a core on the 2-core test host, taken from every
    later test (the demo's ran a minute slower beside it)."""
    from ray import serve
    from ray.serve.config import gRPCOptions

    http_port, grpc_port = free_port(), free_port()
    serve.start(  # the proxy hooks and gRPC limit of config/serve.yaml, as `arcface serve` starts
        http_options={"host": "127.0.0.1", "port": http_port},
        grpc_options=gRPCOptions(port=grpc_port, grpc_servicer_functions=[GRPC_SERVICER]),
        controller_options=controller_options(load_serve_config()),
    )
    yield ServeEndpoints(f"http://127.0.0.1:{http_port}", f"127.0.0.1:{grpc_port}", ray_local)
    serve.shutdown()


def _applications() -> set[str]:
    """The Serve applications on the session's Ray; empty where Serve is not running (a test
    that needs no Serve must not start it)."""
    import ray

    if not ray.is_initialized():
        return set()
    from ray import serve
    from ray.serve.exceptions import RayServeException

    try:
        return set(serve.status().applications)
    except RayServeException:
        return set()


def _delete_applications_since(before: set[str]) -> None:
    from ray import serve

    for name in sorted(_applications() - before):
        serve.delete(name, _blocking=False)  # the controller stops it while the next test runs


@pytest.fixture(autouse=True, scope="module")
def _module_applications_deleted():
    """Each application a module's fixtures deploy is deleted when the module ends, and
    (below) each one a test deploys when that test ends: an idle replica costs about 4% of a
    core here (the suite reports metrics every second), and the ~17 applications the tests
    left alive together took half of this 2-core host from every test after them."""
    before = _applications()
    yield
    _delete_applications_since(before)


@pytest.fixture(autouse=True)
def _test_applications_deleted(_module_applications_deleted):
    before = _applications()
    yield
    _delete_applications_since(before)


@pytest.fixture(scope="session")
def engine(mbf_model):
    """The engine the test applications serve (``support.SERVE_MODEL_ARGS``), in this process."""
    from engines import get_engine

    return get_engine("onnx", mbf_model)
