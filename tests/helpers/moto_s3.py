"""A real S3 API on 127.0.0.1 for the engine-store and cache tests (moto in server mode).

Tests talk to it through boto3 over HTTP, exactly as production talks to AWS
or MinIO; no client is patched. ``tests/conftest.py`` exposes the fixtures
(tests/helpers/ is on sys.path, so any conftest can).
"""

from __future__ import annotations

import socket
import uuid

import pytest


@pytest.fixture(scope="session")
def s3_endpoint() -> str:
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def aws_env(monkeypatch):
    """Credentials moto accepts; subprocesses inherit them through the environment."""
    for name, value in (("AWS_ACCESS_KEY_ID", "testing"), ("AWS_SECRET_ACCESS_KEY", "testing"),
                        ("AWS_DEFAULT_REGION", "us-east-1")):
        monkeypatch.setenv(name, value)
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def bucket(s3_endpoint, aws_env) -> str:
    """A fresh bucket per test, so tests never see each other's engines or locks."""
    from engines.s3 import make_client

    name = f"engines-{uuid.uuid4().hex[:12]}"
    make_client(s3_endpoint).create_bucket(Bucket=name)
    return name


def dead_endpoint() -> str:
    """An http endpoint on 127.0.0.1 where nothing listens (connection refused)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"
