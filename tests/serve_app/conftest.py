"""A real Serve instance on the session's local Ray, with HTTP and gRPC on free ports."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from support import free_port

GRPC_SERVICER = "serve_app.protos.embedding_pb2_grpc.add_EmbeddingServiceServicer_to_server"


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
    serve.start(
        http_options={"host": "127.0.0.1", "port": http_port},
        grpc_options=gRPCOptions(port=grpc_port, grpc_servicer_functions=[GRPC_SERVICER]),
    )
    return ServeEndpoints(f"http://127.0.0.1:{http_port}", f"127.0.0.1:{grpc_port}", ray_local)
