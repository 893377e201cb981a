"""Without Ray: the OpenAPI document as built, multipart planning, the client's retry arithmetic
and answer handling (the running-service tests are test_api.py and test_client.py)."""

from __future__ import annotations

import asyncio
import json

import cv2
import numpy as np
import pytest
from openapi_spec_validator import validate

from serve_app.client import ContractMismatch, RetryPolicy, _error, _Protocol, decode_embed_response
from serve_app.codec import Limits, plan_embed_json, run_jobs
from serve_app.errors import RequestError
from serve_app.multipart import plan_multipart
from serve_app.protos import embedding_pb2 as pb
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


def test_grpc_answers_decode_in_either_encoding_and_bad_ones_are_refused():
    """A PACKED answer is one frombuffer; a REPEATED one (an older server ignores the request's
    encoding) reads the same; an answer whose bytes do not add up is an error, not a reshape."""
    rng = np.random.default_rng(1)
    emb, norms = rng.standard_normal((3, 8)).astype(np.float32), np.array([1.5, 2.0, 2.5], np.float32)
    packed = pb.EmbedResponse(dim=8, encoding=pb.PACKED, embeddings_f32=emb.tobytes(), norms=norms)
    repeated = pb.EmbedResponse(dim=8, embeddings=[pb.Embedding(values=e, norm=n)
                                                   for e, n in zip(emb, norms, strict=True)])
    for reply in (packed, repeated):
        got, got_norms = decode_embed_response(pb.EmbedResponse.FromString(reply.SerializeToString()), 3)
        assert got.shape == (3, 8) and got.dtype == np.float32
        np.testing.assert_array_equal(got, emb)
        np.testing.assert_array_equal(got_norms, norms)
    short = pb.EmbedResponse(dim=8, encoding=pb.PACKED, embeddings_f32=emb.tobytes()[:-4], norms=norms)
    with pytest.raises(ValueError, match=r"92 bytes of embeddings_f32 for 3 norms of dim 8 \(expected 96\)"):
        decode_embed_response(short)
    with pytest.raises(ValueError, match="answered 3 embeddings for 4 faces"):
        decode_embed_response(packed, 4)
    with pytest.raises(ValueError, match="encoding 5"):
        decode_embed_response(pb.EmbedResponse(dim=8, encoding=5))


@pytest.mark.parametrize(("headers", "allowed"), [
    ({}, True),  # not a browser: curl -F, serve_app.client
    ({"origin": "http://127.0.0.1:8000", "host": "127.0.0.1:8000"}, True),  # a page the service serves
    ({"origin": "http://localhost:8000", "host": "localhost:8000"}, True),
    ({"origin": "http://[::1]:8000", "host": "[::1]:8000"}, True),
    ({"origin": "https://Faces.Example", "host": "faces.example", "x-forwarded-proto": "https"}, True),
    ({"origin": "https://faces.example", "host": "10.0.0.5:8000", "x-forwarded-host": "faces.example",
      "x-forwarded-proto": "https"}, True),
    ({"origin": "https://elsewhere.example", "host": "faces.example"}, False),
    ({"origin": "http://127.0.0.1:9999", "host": "127.0.0.1:8000"}, False),  # another port, another origin
    ({"origin": "https://127.0.0.1:8000", "host": "127.0.0.1:8000"}, False),  # another scheme
    ({"origin": "https://faces.example", "host": "faces.example"}, False),  # https page, plain-HTTP service
    # DNS rebinding: the attacker's name now resolves to 127.0.0.1; Host and Origin agree
    ({"origin": "http://rebind.evil.example:8000", "host": "rebind.evil.example:8000"}, False),
    ({"origin": "null", "host": "faces.example"}, False),  # a sandboxed frame or a file: page
    ({"origin": "http://[::1", "host": "faces.example"}, False),  # malformed
    ({"origin": "https://faces.example"}, False),  # no Host to be the same as
])
def test_only_the_services_own_origin_may_post_from_a_browser(headers, allowed):
    from serve_app.origin import check_same_origin

    if allowed:
        check_same_origin(headers, allowed_hosts=("faces.example",))
        return
    with pytest.raises(RequestError) as err:
        check_same_origin(headers, allowed_hosts=("faces.example",))
    assert (err.value.status, err.value.reason) == (403, "cross_origin")
    assert headers["origin"][:20] in err.value.message
