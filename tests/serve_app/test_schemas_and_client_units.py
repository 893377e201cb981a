"""Without Ray: the OpenAPI document as built, multipart planning, the client's retry arithmetic
and answer handling (the running-service tests are test_api.py and test_client.py)."""

from __future__ import annotations

import asyncio
import json

import cv2
import numpy as np
import pytest
from openapi_spec_validator import validate

from serve_app.client import ContractMismatch, RetryPolicy, _error, _Protocol
from serve_app.codec import Limits, plan_embed_json, run_jobs
from serve_app.errors import RequestError
from serve_app.multipart import plan_multipart
from serve_app.schemas import ROUTES, build_openapi


def test_the_apps_document_is_valid_openapi_and_covers_every_route():
    from serve_app.deployment import api  # imports Serve, starts nothing

    spec = api.openapi()
    validate(spec)
    assert {(r.path, r.method) for r in ROUTES} == {(p, m) for p, ops in spec["paths"].items() for m in ops}
    assert "requestBody" in spec["paths"]["/v1/embed"]["post"]
    assert set(spec["paths"]["/v1/compare"]["post"]["responses"]) >= {"200", "409", "422", "503"}
    assert build_openapi(spec)["paths"] == spec["paths"]  # merging twice changes nothing


def test_retry_waits_at_least_retry_after_and_backs_off():
    policy = RetryPolicy(retries=3, backoff_s=0.1, max_backoff_s=1.0)
    assert policy.delay(0, None) == pytest.approx(0.1)
    assert policy.delay(3, None) == pytest.approx(0.8)
    assert policy.delay(10, None) == 1.0
    assert policy.delay(0, 2.0) == 2.0  # Retry-After wins over a shorter backoff


def test_error_bodies_become_service_errors():
    err = _error(503, json.dumps({"error": {"status": 503, "reason": "overloaded", "message": "m"}}).encode(),
                 "1")
    assert (err.status, err.reason, err.retry_after_s) == (503, "overloaded", 1.0)
    assert _error(502, b"<html>bad gateway", None).reason == "unknown"


def test_the_first_contract_is_pinned_and_another_refused():
    protocol = _Protocol("http://x")
    assert protocol._check("arcemb-v1-a") == "arcemb-v1-a"
    with pytest.raises(ContractMismatch):
        protocol._check("arcemb-v1-b")
    with pytest.raises(ValueError):
        _Protocol("http://x", transport="xml")


def _multipart(parts: list[tuple[str, bytes, bool]]) -> tuple[bytes, str]:
    boundary = "XyZ"
    body = b""
    for name, data, is_file in parts:
        filename = f'; filename="{name}.png"' if is_file else ""
        body += (f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"{filename}\r\n\r\n').encode()
        body += data + b"\r\n"
    return body + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def test_multipart_plans_like_the_json_body(faces):
    pngs = [cv2.imencode(".png", f)[1].tobytes() for f in faces[:3]]
    body, ctype = _multipart([("images", p, True) for p in pngs])
    crops = run_jobs(asyncio.run(plan_multipart(body, ctype, Limits())))
    assert np.array_equal(crops, faces[:3])
    body, ctype = _multipart([("images", pngs[0], True), ("aligned", b"false", False)])
    with pytest.raises(RequestError) as multipart_err:
        asyncio.run(plan_multipart(body, ctype, Limits()))
    with pytest.raises(RequestError) as json_err:
        plan_embed_json({"images": ["AA=="], "aligned": False}, Limits())
    assert multipart_err.value.to_dict() == json_err.value.to_dict()
    body, ctype = _multipart([("images", pngs[0], True)] * 3)
    with pytest.raises(RequestError) as err:
        asyncio.run(plan_multipart(body, ctype, Limits(max_faces=2)))
    assert (err.value.status, err.value.reason) == (413, "too_many_faces")
