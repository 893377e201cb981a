"""The Grafana dashboard queries only what the service exports: every metric name (and every
label it filters or groups by) is checked against a scrape of a running service's metrics port."""

from __future__ import annotations

import re
import time

import pytest
import requests
from support import dashboard_queries, deploy

from serve_app.client import EmbeddingClient, GrpcEmbeddingClient, ServiceError

pytestmark = pytest.mark.integration

_SERIES = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? ")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="')
_PROMQL_WORDS = {"le", "by", "sum", "max", "rate", "increase", "histogram_quantile"}


def scrape(port: int) -> dict[str, set[str]]:
    """metric name -> the label names its series carry."""
    text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    out: dict[str, set[str]] = {}
    for line in text.splitlines():
        match = _SERIES.match(line)
        if match and not line.startswith("#"):
            out.setdefault(match.group(1), set()).update(_LABEL.findall(match.group(2) or ""))
    return out


def test_every_metric_the_dashboard_queries_is_exported(serve_endpoints, faces):
    deploy("dash", {"max_faces_per_request": 8})
    url = serve_endpoints.http + "/dash"
    with EmbeddingClient(url) as client:
        for _ in range(3):
            client.embed(faces[:6])
        with pytest.raises(ServiceError):  # one refusal: the rejected-requests counter exists
            client.embed_images([b"not an image"])
    with GrpcEmbeddingClient(serve_endpoints.grpc, application="dash") as grpc_client:
        grpc_client.embed(faces[:2])
    wanted = {name for expr in dashboard_queries() for name in re.findall(r"\bray_[a-z0-9_]+", expr)}
    deadline = time.monotonic() + 60
    while True:  # metrics reach the node's exporter within a few report intervals
        exported = scrape(serve_endpoints.metrics_port)
        missing = sorted(wanted - set(exported))
        if not missing or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert not missing, f"the dashboard queries metrics the service does not export: {missing}"
    for expr in dashboard_queries():
        for name, matchers in re.findall(r"\b(ray_[a-z0-9_]+)\{([^}]*)\}", expr):
            labels = set(_LABEL.findall(matchers)) | set(re.findall(r"([a-z_]+)=~", matchers))
            assert labels <= exported[name], (name, labels - exported[name])
        names = re.findall(r"\bray_[a-z0-9_]+", expr)
        for group in re.findall(r"by \(([^)]*)\)", expr):
            for label in (g.strip() for g in group.split(",")):
                if label not in _PROMQL_WORDS:
                    assert any(label in exported[n] for n in names), (expr, label)
