"""The service on a real local Ray with real HTTP and gRPC clients."""

from __future__ import annotations

import base64
import io
import json
import time
from concurrent.futures import ThreadPoolExecutor

import cv2
import grpc
import numpy as np
import pytest
import requests
from support import deploy, deploy_from_config, png_bomb

from engines import get_engine
from engines.base.align import norm_crop
from engines.models.sample_faces import source_faces
from serve_app.codec import NPY_MEDIA_TYPE, encode_npy
from serve_app.protos import embedding_pb2 as pb
from serve_app.protos import embedding_pb2_grpc as pb_grpc

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def main_url(serve_endpoints):
    deploy("main", user_config={"max_batch_size": 16, "batch_wait_timeout_s": 0.05})
    return serve_endpoints.http + "/main"


@pytest.fixture(scope="module")
def engine(mbf_model):
    return get_engine("onnx", mbf_model)


@pytest.fixture(scope="module")
def stub(serve_endpoints):
    channel = grpc.insecure_channel(serve_endpoints.grpc)
    yield pb_grpc.EmbeddingServiceStub(channel)
    channel.close()


GRPC_META = (("application", "main"),)


def _b64(image: np.ndarray) -> str:
    return base64.b64encode(cv2.imencode(".png", image)[1].tobytes()).decode()


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (np.asarray(a) * np.asarray(b)).sum(1)


def test_npy_body_matches_the_engine(main_url, engine, faces):
    resp = requests.post(main_url + "/v1/embed", data=encode_npy(faces),
                         headers={"content-type": NPY_MEDIA_TYPE}, timeout=60)
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["dim"] == 512 and body["backend"] == "onnx"
    assert body["contract"] == engine.info.contract and body["synthetic"] is True
    assert _cos(body["embeddings"], engine.encode(faces)).min() >= 0.99999


def test_npy_response_when_asked(main_url, engine, faces):
    resp = requests.post(main_url + "/v1/embed", data=encode_npy(faces[:5]),
                         headers={"content-type": NPY_MEDIA_TYPE, "accept": NPY_MEDIA_TYPE}, timeout=60)
    assert resp.status_code == 200 and resp.headers["content-type"] == NPY_MEDIA_TYPE
    out = np.load(io.BytesIO(resp.content))
    assert out.shape == (5, 512) and out.dtype == np.float32
    assert resp.headers["x-arcface-contract"] == engine.info.contract
    assert _cos(out, engine.encode(faces[:5])).min() >= 0.99999


def test_json_images_with_and_without_landmarks(main_url, engine):
    sources = source_faces()
    crops = np.stack([f.crop for f in sources])
    aligned = requests.post(main_url + "/v1/embed", json={"images": [_b64(c) for c in crops]}, timeout=60)
    assert aligned.status_code == 200, aligned.text
    expected = engine.encode(crops)
    assert _cos(aligned.json()["embeddings"], expected).min() >= 0.99999
    t1 = [f for f in sources if f.image_file == "t1.jpg"]
    full = {"images": [_b64(f.image) for f in t1[:2]], "landmarks": [f.landmarks.tolist() for f in t1[:2]]}
    resp = requests.post(main_url + "/v1/embed", json=full, timeout=60)
    assert resp.status_code == 200, resp.text
    direct = engine.encode(np.stack([norm_crop(f.image, f.landmarks) for f in t1[:2]]))
    assert _cos(resp.json()["embeddings"], direct).min() >= 0.99999


def test_grpc_embed_batch_and_health(main_url, stub, engine, faces):
    resp = stub.EmbedBatch(pb.EmbedBatchRequest(crops=faces[:4].tobytes()), metadata=GRPC_META, timeout=60)
    got = np.array([e.values for e in resp.embeddings])
    assert got.shape == (4, 512) and resp.contract == engine.info.contract
    assert _cos(got, engine.encode(faces[:4])).min() >= 0.99999
    pngs = [pb.Face(image=cv2.imencode(".png", f)[1].tobytes()) for f in faces[:2]]
    encoded = pb.EmbedBatchRequest(faces=pngs)
    got = np.array([e.values for e in stub.EmbedBatch(encoded, metadata=GRPC_META, timeout=60).embeddings])
    assert _cos(got, engine.encode(faces[:2])).min() >= 0.99999
    one = stub.Embed(pb.EmbedRequest(face=pb.Face(image=faces[0].tobytes())), metadata=GRPC_META, timeout=60)
    assert len(one.embeddings) == 1 and one.embeddings[0].norm > 0
    health = stub.Health(pb.HealthRequest(), metadata=GRPC_META, timeout=30)
    assert health.status == "ok" and health.backend == "onnx"


def test_grpc_bad_input_is_invalid_argument(main_url, stub, faces):
    with pytest.raises(grpc.RpcError) as info:
        stub.EmbedBatch(pb.EmbedBatchRequest(crops=b"\x00" * 100), metadata=GRPC_META, timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "37632" in info.value.details()
    with pytest.raises(grpc.RpcError) as info:
        stub.Embed(pb.EmbedRequest(face=pb.Face(image=b"not an image")), metadata=GRPC_META, timeout=30)
    assert "not_an_image" in info.value.details()
    ok = stub.EmbedBatch(pb.EmbedBatchRequest(crops=faces[:1].tobytes()), metadata=GRPC_META, timeout=30)
    assert len(ok.embeddings) == 1


def test_concurrent_single_face_requests_are_coalesced(main_url, serve_endpoints, faces):
    before = requests.get(main_url + "/v1/info", timeout=30).json()["batch_stats"]

    def one(i):
        body = encode_npy(faces[i % len(faces)][None])
        return requests.post(main_url + "/v1/embed", data=body,
                             headers={"content-type": NPY_MEDIA_TYPE}, timeout=60).status_code

    with ThreadPoolExecutor(24) as pool:
        codes = list(pool.map(one, range(48)))
    assert codes == [200] * 48
    after = requests.get(main_url + "/v1/info", timeout=30).json()["batch_stats"]
    batches = after["batches"] - before["batches"]
    faces_done = after["faces"] - before["faces"]
    assert faces_done == 48
    assert batches < 48, "every single-face request ran alone: no coalescing"
    assert after["recent"]["max_batch_faces"] > 1
    # the same number, as Prometheus sees it (faces per engine batch histogram)
    deadline = time.monotonic() + 20
    while True:
        text = requests.get(f"http://127.0.0.1:{serve_endpoints.metrics_port}/metrics", timeout=10).text
        counts = [line for line in text.splitlines()
                  if line.startswith("ray_arcface_batch_size_faces_bucket") and 'le="1.0"' in line]
        total = [line for line in text.splitlines() if line.startswith("ray_arcface_batch_size_faces_count")]
        if counts and total:
            le1 = sum(float(line.rsplit(" ", 1)[1]) for line in counts)
            n = sum(float(line.rsplit(" ", 1)[1]) for line in total)
            if n > le1:
                break
        if time.monotonic() > deadline:
            pytest.fail("arcface_batch_size_faces never showed a batch of more than one face")
        time.sleep(1)


def test_user_config_change_takes_effect_without_restart(serve_endpoints, faces):
    url = serve_endpoints.http + "/live"
    deploy_from_config("live", {"max_batch_size": 16, "batch_wait_timeout_s": 0.05})
    before = requests.get(url + "/v1/info", timeout=30).json()["service"]
    assert (before["max_batch_size"], before["batch_wait_timeout_s"]) == (16, 0.05)
    deploy_from_config("live", {"max_batch_size": 4, "batch_wait_timeout_s": 0.02})
    deadline = time.monotonic() + 60
    while True:
        after = requests.get(url + "/v1/info", timeout=30).json()["service"]
        if after["max_batch_size"] == 4 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert (after["max_batch_size"], after["batch_wait_timeout_s"]) == (4, 0.02)
    assert after["max_batch_size_source"] == "user_config.max_batch_size"
    assert (after["replica"], after["pid"]) == (before["replica"], before["pid"]), "replica restarted"
    # the new limit is in force: 10 faces now run as chunks of at most 4
    resp = requests.post(url + "/v1/embed", data=encode_npy(faces[:10]),
                         headers={"content-type": NPY_MEDIA_TYPE}, timeout=60)
    assert resp.status_code == 200
    stats = requests.get(url + "/v1/info", timeout=30).json()["batch_stats"]
    assert stats["recent"]["max_batch_faces"] <= 4
    # null: back to the engine's optimal batch (the onnx engine has no profile: the config's 32)
    deploy_from_config("live", {"max_batch_size": None, "batch_wait_timeout_s": 0.02})
    deadline = time.monotonic() + 60
    while True:
        service = requests.get(url + "/v1/info", timeout=30).json()["service"]
        if service["max_batch_size"] != 4 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert (service["max_batch_size"], service["max_batch_size_source"]) == (32, "embedding.opt_batch_size")


def test_info_health_docs(main_url):
    info = requests.get(main_url + "/v1/info", timeout=30).json()
    for key in ("backend", "model_sha256", "precision", "contract", "embedding_dim", "fallback",
                "batch_stats", "service"):
        assert key in info
    assert requests.get(main_url + "/healthz", timeout=30).json()["status"] == "ok"
    spec = requests.get(main_url + "/openapi.json", timeout=30).json()
    assert {"/v1/embed", "/v1/compare", "/v1/info", "/healthz"} <= set(spec["paths"])
    assert requests.get(main_url + "/docs", timeout=30).status_code == 200


def test_compare(main_url, engine):
    a, b = source_faces()[0].crop, source_faces()[3].crop
    same = requests.post(main_url + "/v1/compare", json={"a": {"image": _b64(a)}, "b": {"image": _b64(a)}},
                         timeout=60).json()
    assert same["cosine"] > 0.9999 and same["same_person"] is True
    emb = engine.encode(np.stack([a, b]))
    mixed = requests.post(
        main_url + "/v1/compare",
        json={"a": {"image": _b64(a)}, "b": {"embedding": emb[1].tolist()}, "threshold": 0.99},
        timeout=60,
    ).json()
    assert mixed["cosine"] == pytest.approx(float(emb[0] @ emb[1]), abs=1e-5)
    assert mixed["same_person"] is False and mixed["threshold"] == 0.99
    huge = requests.post(main_url + "/v1/compare", timeout=60, json={  # float32 squares would overflow
        "a": {"embedding": (emb[0].astype(float) * 1e30).tolist()}, "b": {"embedding": emb[1].tolist()}})
    assert huge.status_code == 200, huge.text
    assert huge.json()["cosine"] == pytest.approx(float(emb[0] @ emb[1]), abs=1e-5)
    clash = requests.post(main_url + "/v1/compare", timeout=60, json={
        "a": {"embedding": emb[0].tolist()}, "b": {"embedding": emb[1].tolist()}, "contract": "arcemb-v1-x"})
    assert clash.status_code == 409 and "contract" in clash.json()["error"]["message"]


def _npy_raw(array) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


def _json_raw(payload) -> dict:
    """A JSON body as bytes, NaN/Infinity literals included (``requests(json=)`` refuses them)."""
    return {"data": json.dumps(payload).encode(), "headers": {"content-type": "application/json"}}


_PHOTO = source_faces()[0]  # 1280x886, detector landmarks
_KPS = _PHOTO.landmarks.tolist()
_PIXEL_PNG = _b64(np.zeros((1, 1, 3), np.uint8))


def _with_landmarks(landmarks, image: str | None = None) -> dict:
    return {"json": {"images": [image or _b64(_PHOTO.image)], "landmarks": [landmarks]}}


def _compare_face(landmarks) -> dict:
    side = {"image": _b64(_PHOTO.image), "landmarks": landmarks}
    return {"a": side, "b": {"image": _b64(_PHOTO.crop)}}


# (id, path, requests kwargs, status, reason)
BAD_REQUESTS = [
    ("invalid base64", "/v1/embed", {"json": {"images": ["%%%"]}}, 400, "bad_base64"),
    ("not an image", "/v1/embed", {"json": {"images": [base64.b64encode(b"plain text").decode()]}},
     422, "not_an_image"),
    ("npy wrong shape", "/v1/embed", {"data": _npy_raw(np.zeros((2, 50, 50, 3), np.uint8)),
                                      "headers": {"content-type": NPY_MEDIA_TYPE}}, 422, "bad_shape"),
    ("npy wrong dtype", "/v1/embed", {"data": _npy_raw(np.zeros((2, 112, 112, 3), np.float64)),
                                      "headers": {"content-type": NPY_MEDIA_TYPE}}, 422, "bad_dtype"),
    ("npy garbage", "/v1/embed", {"data": b"\x93NUMPY garbage", "headers": {"content-type": NPY_MEDIA_TYPE}},
     400, "bad_npy"),
    ("empty image list", "/v1/embed", {"json": {"images": []}}, 422, "empty"),
    ("decompression bomb", "/v1/embed",
     {"json": {"images": [base64.b64encode(png_bomb(30000, 30000)).decode()], "aligned": True}},
     413, "image_too_large"),
    ("too many faces", "/v1/embed", {"data": _npy_raw(np.zeros((300, 112, 112, 3), np.uint8)),
                                     "headers": {"content-type": NPY_MEDIA_TYPE}}, 413, "too_many_faces"),
    ("wrong landmark count", "/v1/embed", _with_landmarks([[1, 2], [3, 4]]), 422, "bad_landmarks"),
    ("identical landmarks", "/v1/embed", _with_landmarks([[50, 50]] * 5), 422, "bad_landmarks"),
    ("nan landmark", "/v1/embed", _json_raw(_with_landmarks([[float("nan"), 1], *_KPS[1:]])["json"]),
     422, "bad_landmarks"),
    ("infinite landmark", "/v1/embed", _json_raw(_with_landmarks([*_KPS[:4], [1, float("inf")]])["json"]),
     422, "bad_landmarks"),
    ("landmark int beyond float", "/v1/embed", _with_landmarks([[10**400, 1], *_KPS[1:]]), 422,
     "bad_landmarks"),
    ("non-numeric landmarks", "/v1/embed", _with_landmarks([["a", "b"]] * 5), 422, "bad_landmarks"),
    ("landmarks far outside", "/v1/embed", _with_landmarks([[x + 1e6, y] for x, y in _KPS]), 422,
     "bad_landmarks"),
    ("1x1 image with landmarks", "/v1/embed", _with_landmarks(_KPS, _PIXEL_PNG), 422, "bad_landmarks"),
    ("body is a list", "/v1/embed", {"json": [_b64(_PHOTO.crop)]}, 422, "bad_request"),
    ("images not a list", "/v1/embed", {"json": {"images": _b64(_PHOTO.crop)}}, 422, "bad_request"),
    ("aligned not a bool", "/v1/embed", {"json": {"images": [_b64(_PHOTO.crop)], "aligned": "yes"}},
     422, "bad_request"),
    ("bad json", "/v1/embed", {"data": b"{oops", "headers": {"content-type": "application/json"}},
     400, "bad_json"),
    ("json nested too deeply", "/v1/embed",
     {"data": b"[" * 100_000, "headers": {"content-type": "application/json"}}, 400, "bad_json"),
    ("wrong media type", "/v1/embed", {"data": b"x", "headers": {"content-type": "text/plain"}}, 415,
     "unsupported_media_type"),
    ("compare: identical landmarks", "/v1/compare", {"json": _compare_face([[50, 50]] * 5)}, 422,
     "bad_landmarks"),
    ("compare: nan landmark", "/v1/compare", _json_raw(_compare_face([[float("nan"), 1], *_KPS[1:]])),
     422, "bad_landmarks"),
    ("compare: landmarks far outside", "/v1/compare",
     {"json": _compare_face([[x, y - 1e7] for x, y in _KPS])}, 422, "bad_landmarks"),
    ("compare: body is a list", "/v1/compare", {"json": [1, 2]}, 422, "bad_request"),
    ("compare: nan threshold", "/v1/compare",
     _json_raw({"a": {"embedding": [1.0] * 512}, "b": {"embedding": [1.0] * 512}, "threshold": float("nan")}),
     422, "bad_request"),
    ("compare: embedding int beyond float", "/v1/compare",
     {"json": {"a": {"embedding": [10**400] * 512}, "b": {"embedding": [1.0] * 512}}}, 422, "bad_embedding"),
]


@pytest.mark.parametrize(
    ("path", "kwargs", "status", "reason"), [c[1:] for c in BAD_REQUESTS], ids=[c[0] for c in BAD_REQUESTS]
)
def test_bad_input_gets_a_precise_4xx_and_service_stays_up(main_url, faces, path, kwargs, status, reason):
    resp = requests.post(main_url + path, timeout=60, **kwargs)
    assert resp.status_code == status, resp.text
    error = resp.json()["error"]
    assert (error["status"], error["reason"]) == (status, reason) and len(error["message"]) > 10
    good = requests.post(main_url + "/v1/embed", data=encode_npy(faces[:1]),
                         headers={"content-type": NPY_MEDIA_TYPE}, timeout=60)
    assert good.status_code == 200


def _grpc_face(landmarks, image: np.ndarray | None = None) -> pb.Face:
    image = _PHOTO.image if image is None else image
    return pb.Face(image=cv2.imencode(".png", image)[1].tobytes(), landmarks=np.ravel(landmarks).tolist())


# (id, method, request, fragment of the details); all INVALID_ARGUMENT
BAD_GRPC = [
    ("identical landmarks", "Embed", pb.EmbedRequest(face=_grpc_face([[50.0, 50.0]] * 5)), "degenerate"),
    ("nan landmark", "EmbedBatch",
     pb.EmbedBatchRequest(faces=[_grpc_face(_KPS), _grpc_face([[float("nan"), 1.0], *_KPS[1:]])]),
     "faces[1].landmarks[0][0]"),
    ("infinite landmark", "Embed", pb.EmbedRequest(face=_grpc_face([*_KPS[:4], [1.0, float("inf")]])),
     "is inf"),
    ("landmarks far outside", "EmbedBatch",
     pb.EmbedBatchRequest(faces=[_grpc_face([[x + 1e6, y] for x, y in _KPS])]), "far outside"),
    ("1x1 image with landmarks", "Embed",
     pb.EmbedRequest(face=_grpc_face(_KPS, np.zeros((1, 1, 3), np.uint8))), "1x1 image"),
    ("3 landmark values", "Embed", pb.EmbedRequest(face=_grpc_face([1.0, 2.0, 3.0])), "10 numbers"),
]


@pytest.mark.parametrize(("method", "request_", "fragment"), [c[1:] for c in BAD_GRPC],
                         ids=[c[0] for c in BAD_GRPC])
def test_grpc_bad_landmarks_are_invalid_argument(main_url, stub, faces, method, request_, fragment):
    with pytest.raises(grpc.RpcError) as info:
        getattr(stub, method)(request_, metadata=GRPC_META, timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
    assert info.value.details().startswith("bad_landmarks: ") and fragment in info.value.details()
    ok = stub.EmbedBatch(pb.EmbedBatchRequest(crops=faces[:1].tobytes()), metadata=GRPC_META, timeout=30)
    assert len(ok.embeddings) == 1


def test_oversized_body_is_refused(serve_endpoints, faces):
    deploy("small", {"max_body_mb": 0.1})
    url = serve_endpoints.http + "/small/v1/embed"
    big = encode_npy(np.zeros((8, 112, 112, 3), np.uint8))  # ~300 KB > 100 KiB
    resp = requests.post(url, data=big, headers={"content-type": NPY_MEDIA_TYPE}, timeout=60)
    assert resp.status_code == 413 and resp.json()["error"]["reason"] == "body_too_large"

    def chunks():  # no content-length: the limit is enforced while streaming
        yield big[:100_000]
        yield big[100_000:]

    resp = requests.post(url, data=chunks(), headers={"content-type": NPY_MEDIA_TYPE}, timeout=60)
    assert resp.status_code == 413
    ok = requests.post(url, data=encode_npy(faces[:1]), headers={"content-type": NPY_MEDIA_TYPE}, timeout=60)
    assert ok.status_code == 200


def test_bearer_token_auth(serve_endpoints, tmp_path_factory, stub, faces):
    token = tmp_path_factory.mktemp("auth") / "token"
    token.write_text("correct horse battery staple\n")
    deploy("secure", {"auth_token_file": str(token)})
    url = serve_endpoints.http + "/secure/v1/embed"
    body, headers = encode_npy(faces[:1]), {"content-type": NPY_MEDIA_TYPE}
    missing = requests.post(url, data=body, headers=headers, timeout=60)
    assert missing.status_code == 401 and missing.headers["www-authenticate"] == "Bearer"
    wrong = requests.post(url, data=body, headers={**headers, "authorization": "Bearer nope"}, timeout=60)
    assert wrong.status_code == 401 and wrong.json()["error"]["reason"] == "unauthorized"
    right = requests.post(url, data=body, timeout=60,
                          headers={**headers, "authorization": "Bearer correct horse battery staple"})
    assert right.status_code == 200
    assert requests.get(serve_endpoints.http + "/secure/healthz", timeout=30).status_code == 200
    with pytest.raises(grpc.RpcError) as info:
        stub.EmbedBatch(pb.EmbedBatchRequest(crops=faces[:1].tobytes()), timeout=30,
                        metadata=(("application", "secure"),))
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    ok = stub.EmbedBatch(pb.EmbedBatchRequest(crops=faces[:1].tobytes()), timeout=30, metadata=(
        ("application", "secure"), ("authorization", "Bearer correct horse battery staple")))
    assert len(ok.embeddings) == 1


def test_overload_gets_503_quickly_and_the_service_recovers(serve_endpoints, faces):
    deploy("tiny", max_ongoing_requests=1, max_queued_requests=1,
           user_config={"max_batch_size": 32, "batch_wait_timeout_s": 0.0})
    url = serve_endpoints.http + "/tiny"
    before = requests.get(url + "/v1/info", timeout=30).json()["service"]
    heavy = encode_npy(np.repeat(faces, 12, axis=0)[:256])  # 256 faces: a slow request

    def one(_):
        started = time.perf_counter()
        resp = requests.post(url + "/v1/embed", data=heavy, headers={"content-type": NPY_MEDIA_TYPE},
                             timeout=120)
        return resp.status_code, time.perf_counter() - started

    with ThreadPoolExecutor(12) as pool:
        results = list(pool.map(one, range(12)))
    codes = [c for c, _ in results]
    assert 503 in codes and 200 in codes, codes
    assert max(t for c, t in results if c == 503) < min(t for c, t in results if c == 200) + 1.0
    ok = requests.post(url + "/v1/embed", data=encode_npy(faces[:2]),
                       headers={"content-type": NPY_MEDIA_TYPE}, timeout=60)
    assert ok.status_code == 200
    after = requests.get(url + "/v1/info", timeout=30).json()["service"]
    assert after["replica"] == before["replica"] and after["pid"] == before["pid"]
