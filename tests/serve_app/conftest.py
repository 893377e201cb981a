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


@pytest.fixture(scope="session")
def serve_endpoints(ray_local) -> ServeEndpoints:
    from ray import serve
    from ray.serve.config import gRPCOptions

    http_port, grpc_port = free_port(), free_port()
    serve.start(  # the proxy hooks and gRPC limit of config/serve.yaml, as `arcface serve` starts
        http_options={"host": "127.0.0.1", "port": http_port},
        grpc_options=gRPCOptions(port=grpc_port, grpc_servicer_functions=[GRPC_SERVICER]),
        controller_options=controller_options(load_serve_config()),
    )
    return ServeEndpoints(f"http://127.0.0.1:{http_port}", f"127.0.0.1:{grpc_port}", ray_local)


@pytest.fixture(scope="session")
def engine(mbf_model):
    """The engine the test applications serve (``support.SERVE_MODEL_ARGS``), in this process."""
    from engines import get_engine

    return get_engine("onnx", mbf_model)
