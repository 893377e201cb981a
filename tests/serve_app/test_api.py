"""What integrators see of the running service: its OpenAPI document, multipart uploads and
the timing fields of every embed/compare answer (HTTP headers, gRPC trailing metadata)."""

from __future__ import annotations

import base64
import json
from urllib.parse import urlsplit

import cv2
import numpy as np
import pytest
import requests
from openapi_spec_validator import validate
from support import deploy

from engines.base.align import norm_crop
from engines.models.sample_faces import source_faces
from serve_app.codec import NPY_MEDIA_TYPE, encode_npy
from serve_app.schemas import ROUTES
from serve_app.timing import TIMING_HEADERS

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def url(serve_endpoints):
    deploy("api", {"max_queue_wait_s": 30, "max_faces_per_request": 8},
           user_config={"max_batch_size": 16, "batch_wait_timeout_s": 0.01})
    return serve_endpoints.http + "/api"


def _png(image: np.ndarray) -> bytes:
    return cv2.imencode(".png", image)[1].tobytes()


def _cos(a, b) -> np.ndarray:
    return (np.asarray(a) * np.asarray(b)).sum(1)


def _resolve(spec: dict, schema: dict) -> dict:
    while "$ref" in schema:
        schema = spec["components"]["schemas"][schema["$ref"].rsplit("/", 1)[1]]
    return schema


def test_openapi_is_valid_and_describes_every_route(url):
    spec = requests.get(url + "/openapi.json", timeout=30).json()
    validate(spec)  # raises on an invalid document
    assert spec["components"]["securitySchemes"]["bearerAuth"] == {
        "type": "http", "scheme": "bearer", "description": spec["components"]["securitySchemes"][
            "bearerAuth"]["description"]}
    served = {(path, method) for path, ops in spec["paths"].items() for method in ops}
    assert {(r.path, r.method) for r in ROUTES} == served  # no route undescribed, none invented
    for route in ROUTES:
        op = spec["paths"][route.path][route.method]
        for media in route.requests:
            schema = _resolve(spec, op["requestBody"]["content"][media]["schema"])
            assert schema.get("properties") or schema.get("oneOf") or schema.get("format") == "binary", media
        ok = op["responses"]["200"]["content"]
        assert set(ok) == set(route.responses)
        for media in ok:
            schema = _resolve(spec, ok[media]["schema"])
            assert schema.get("properties") or schema.get("format") == "binary"
        for status in route.errors:
            ref = op["responses"][str(status)]["content"]["application/json"]["schema"]["$ref"]
            assert ref.endswith("/ErrorResponse")
        assert "422" not in op["responses"] or route.errors.count(422)  # not FastAPI's validation error
        assert ("security" in op) == route.auth
        if route.timing:
            assert set(op["responses"]["200"]["headers"]) == set(TIMING_HEADERS)
    assert "HTTPValidationError" not in spec["components"]["schemas"]
    embed = spec["paths"]["/v1/embed"]["post"]["requestBody"]["content"]
    assert {"application/json", NPY_MEDIA_TYPE, "multipart/form-data"} == set(embed)
    reasons = spec["components"]["schemas"]["ErrorDetail"]["properties"]["reason"]["enum"]
    assert {"bad_landmarks", "overloaded", "bad_multipart"} <= set(reasons)


def test_answers_match_their_schemas(url, faces):
    """The answers the service gives validate against the schemas it publishes."""
    schemas = requests.get(url + "/openapi.json", timeout=30).json()["components"]["schemas"]

    def check(body, name):
        _validate(body, name, schemas)

    embed = requests.post(url + "/v1/embed", data=encode_npy(faces[:2]),
                          headers={"content-type": NPY_MEDIA_TYPE}, timeout=60)
    check(embed.json(), "EmbedResponse")
    side = {"crop": base64.b64encode(faces[0].tobytes()).decode()}
    compare = requests.post(url + "/v1/compare", json={"a": side, "b": side}, timeout=60)
    check(compare.json(), "CompareResponse")
    check(requests.get(url + "/v1/info", timeout=30).json(), "InfoResponse")
    check(requests.get(url + "/healthz", timeout=30).json(), "HealthResponse")
    check(requests.post(url + "/v1/embed", json={"images": []}, timeout=30).json(), "ErrorResponse")


def _validate(body, name, schemas) -> None:
    import jsonschema

    root = {"$ref": f"#/components/schemas/{name}", "components": {"schemas": schemas}}
    jsonschema.Draft202012Validator(root).validate(body)


def test_timing_headers_on_every_embed_and_compare_answer(url, faces):
    crops = faces[:3]
    answers = {
        "npy": requests.post(url + "/v1/embed", data=encode_npy(crops),
                             headers={"content-type": NPY_MEDIA_TYPE}, timeout=60),
        "npy answer": requests.post(url + "/v1/embed", data=encode_npy(crops),
                                    headers={"content-type": NPY_MEDIA_TYPE, "accept": NPY_MEDIA_TYPE},
                                    timeout=60),
        "json images": requests.post(url + "/v1/embed", json={"images": [
            base64.b64encode(_png(c)).decode() for c in crops]}, timeout=60),
        "multipart": requests.post(url + "/v1/embed", files=[("images", _png(c)) for c in crops], timeout=60),
        "compare": requests.post(url + "/v1/compare", json={
            "a": {"image": base64.b64encode(_png(crops[0])).decode()},
            "b": {"crop": base64.b64encode(crops[1].tobytes()).decode()}}, timeout=60),
    }
    for name, resp in answers.items():
        assert resp.status_code == 200, (name, resp.text)
        got = {k: float(resp.headers[k]) for k in TIMING_HEADERS}
        assert got["x-batch-faces"] >= (2 if name == "compare" else 3), (name, got)
        assert got["x-compute-time"] > 0 and got["x-queue-time"] >= 0, (name, got)
        # the parts of a request's time fit in its total (a split request's queue is its longest)
        parts = got["x-decode-time"] + got["x-queue-time"] + got["x-compute-time"]
        assert parts <= got["x-total-time"] + 0.01, (name, got)
        assert (got["x-decode-time"] > 0) == (name in ("json images", "multipart", "compare")), (name, got)
    refused = requests.post(url + "/v1/info", timeout=30)  # not a route: POST on info
    assert refused.status_code == 405 and "x-total-time" not in refused.headers


def test_grpc_answers_carry_the_timing_fields_as_trailing_metadata(url, serve_endpoints, faces):
    import grpc

    from serve_app.protos import embedding_pb2 as pb
    from serve_app.protos import embedding_pb2_grpc as pb_grpc

    with grpc.insecure_channel(serve_endpoints.grpc) as channel:
        stub = pb_grpc.EmbeddingServiceStub(channel)
        reply, call = stub.EmbedBatch.with_call(pb.EmbedBatchRequest(crops=faces[:4].tobytes()),
                                                metadata=(("application", "api"),), timeout=60)
    trailing = dict(call.trailing_metadata())
    assert len(reply.embeddings) == 4
    assert set(TIMING_HEADERS) <= set(trailing), trailing
    assert int(trailing["x-batch-faces"]) >= 4 and float(trailing["x-compute-time"]) > 0


def test_multipart_upload_matches_the_engine(url, engine):
    sources = source_faces()
    crops = np.stack([f.crop for f in sources[:3]])
    aligned = requests.post(url + "/v1/embed", files=[("images", (f"{i}.png", _png(c), "image/png"))
                                                      for i, c in enumerate(crops)], timeout=60)
    assert aligned.status_code == 200, aligned.text
    assert _cos(aligned.json()["embeddings"], engine.encode(crops)).min() >= 0.99999
    t1 = [f for f in sources if f.image_file == "t1.jpg"][:2]
    resp = requests.post(url + "/v1/embed", files=[("images", _png(f.image)) for f in t1],
                         data={"landmarks": json.dumps([f.landmarks.tolist() for f in t1])}, timeout=60)
    assert resp.status_code == 200, resp.text
    direct = engine.encode(np.stack([norm_crop(f.image, f.landmarks) for f in t1]))
    assert _cos(resp.json()["embeddings"], direct).min() >= 0.99999


_PHOTO = source_faces()[0]
_KPS = _PHOTO.landmarks.tolist()


def _multipart_json_pair(images: list[bytes], landmarks=None) -> tuple[dict, dict]:
    """The same request as multipart and as JSON."""
    data = {} if landmarks is None else {"landmarks": json.dumps(landmarks)}
    body = {"images": [base64.b64encode(d).decode() for d in images]}
    if landmarks is not None:
        body["landmarks"] = landmarks
    return {"files": [("images", d) for d in images], "data": data}, {"json": body}


# (id, images, landmarks): refused with the same status, reason and message as the JSON body
SAME_AS_JSON = [
    ("not an image", [b"plain text"], None),
    ("landmark count", [_png(_PHOTO.image)] * 2, [_KPS]),
    ("nan landmark", [_png(_PHOTO.image)], [[[float("nan"), 1.0], *_KPS[1:]]]),
    ("unaligned", [_png(_PHOTO.image)], None),
    ("too many faces", [_png(_PHOTO.crop)] * 9, None),
]


@pytest.mark.parametrize(("images", "landmarks"), [c[1:] for c in SAME_AS_JSON],
                         ids=[c[0] for c in SAME_AS_JSON])
def test_multipart_refusals_are_the_json_bodys(url, images, landmarks):
    multipart, as_json = _multipart_json_pair(images, landmarks)
    if landmarks and any(np.isnan(np.asarray(k, float)).any() for k in landmarks):
        as_json = {"data": json.dumps(as_json["json"]).encode(),
                   "headers": {"content-type": "application/json"}}
    a = requests.post(url + "/v1/embed", timeout=60, **multipart)
    b = requests.post(url + "/v1/embed", timeout=60, **as_json)
    assert a.status_code == b.status_code and 400 <= a.status_code < 500, (a.text, b.text)
    assert a.json() == b.json()


MULTIPART_ONLY = [
    ("text part for images", {"data": {"images": "abc"}}, 422, "bad_request", "must be a file"),
    ("unknown part", {"files": [("images", _png(_PHOTO.crop)), ("photo", b"x")]}, 422, "bad_request",
     "unknown part"),
    ("landmarks not json", {"files": [("images", _png(_PHOTO.image))], "data": {"landmarks": "[[1,"}}, 422,
     "bad_landmarks", "not valid JSON"),
    ("landmarks nested 5,000 deep", {"files": [("images", _png(_PHOTO.image))],
                                     "data": {"landmarks": "[" * 5000 + "]" * 5000}}, 422,
     "bad_landmarks", "nested too deeply"),
    ("aligned not a bool", {"files": [("images", _png(_PHOTO.crop))], "data": {"aligned": "maybe"}}, 422,
     "bad_request", "true or false"),
    ("no files", {"data": {"aligned": "true"}}, 422, "empty", "no faces"),
    ("broken multipart", {"data": b"--xyz\r\nnot a part", "headers": {
        "content-type": "multipart/form-data; boundary=xyz"}}, 400, "bad_multipart", "multipart"),
    ("no boundary", {"data": b"x", "headers": {"content-type": "multipart/form-data"}}, 400, "bad_multipart",
     "boundary"),
    # a cross-site form (issue 18's content-type rule, for the one type such a form can send)
    ("from another site's page", {"files": [("images", _png(_PHOTO.crop))],
                                  "headers": {"origin": "https://elsewhere.example"}}, 403, "cross_origin",
     "elsewhere.example"),
    ("from an opaque origin", {"files": [("images", _png(_PHOTO.crop))], "headers": {"origin": "null"}}, 403,
     "cross_origin", "null"),
]


@pytest.mark.parametrize(("kwargs", "status", "reason", "fragment"), [c[1:] for c in MULTIPART_ONLY],
                         ids=[c[0] for c in MULTIPART_ONLY])
def test_bad_multipart_gets_a_precise_4xx(url, faces, kwargs, status, reason, fragment):
    kwargs = dict(kwargs)
    if "files" not in kwargs and "headers" not in kwargs:
        # requests sends text fields alone urlencoded: build the multipart body by hand
        boundary = "b0undary"
        parts = "".join(f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'
                        for k, v in kwargs.pop("data").items())
        kwargs["data"] = (parts + f"--{boundary}--\r\n").encode()
        kwargs["headers"] = {"content-type": f"multipart/form-data; boundary={boundary}"}
    resp = requests.post(url + "/v1/embed", timeout=60, **kwargs)
    assert resp.status_code == status, resp.text
    error = resp.json()["error"]
    assert error["reason"] == reason and fragment in error["message"], error
    ok = requests.post(url + "/v1/embed", data=encode_npy(faces[:1]),
                       headers={"content-type": NPY_MEDIA_TYPE}, timeout=60)
    assert ok.status_code == 200


def test_a_multipart_upload_from_the_services_own_page_is_taken(url):
    own = "http://" + urlsplit(url).netloc  # what a browser sends from a page this service serves
    resp = requests.post(url + "/v1/embed", files=[("images", _png(_PHOTO.crop))], headers={"origin": own},
                         timeout=60)
    assert resp.status_code == 200, resp.text
    assert len(resp.json()["embeddings"]) == 1


@pytest.mark.parametrize("route", ["/v1/embed", "/v1/compare", "/v1/identify"])
def test_a_page_on_a_rebound_dns_name_is_refused_on_every_route(url, route):
    """DNS rebinding: the attacker's name resolves to this loopback service, so its page is
    same-origin to the browser and may POST JSON; the name is one the service does not know."""
    port = urlsplit(url).port
    rebound = {"host": f"rebind.evil.example:{port}", "origin": f"http://rebind.evil.example:{port}"}
    resp = requests.post(url + route, json={"crops": []}, headers=rebound, timeout=60)
    assert resp.status_code == 403 and resp.json()["error"]["reason"] == "cross_origin", resp.text
    assert "DNS-rebinding" in resp.json()["error"]["message"]


def test_a_multipart_body_over_the_limit_is_refused_before_parsing(serve_endpoints):
    deploy("mp_small", {"max_body_mb": 0.05})
    resp = requests.post(serve_endpoints.http + "/mp_small/v1/embed",
                         files=[("images", b"\x89PNG" + b"\0" * 100_000)], timeout=60)
    assert resp.status_code == 413 and resp.json()["error"]["reason"] == "body_too_large", resp.text
