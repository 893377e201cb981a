"""The service on a real local Ray with real HTTP and gRPC clients."""

from __future__ import annotations

import base64
import io
import json
import time
from concurrent.futures import ThreadPoolExecutor

import cv2
import grpc
import hostile
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
    # max_queue_wait_s: concurrent requests here must all be served on a slow or busy machine
    # (the time bound has tests of its own, on their own applications)
    deploy("main", {"max_queue_wait_s": 30}, user_config={"max_batch_size": 16, "batch_wait_timeout_s": 0.05})
    return serve_endpoints.http + "/main"


@pytest.fixture(scope="module")
def engine(mbf_model):
    return get_engine("onnx", mbf_model)


@pytest.fixture(scope="module")
def channel(serve_endpoints):
    channel = grpc.insecure_channel(serve_endpoints.grpc)
    yield channel
    channel.close()


@pytest.fixture(scope="module")
def stub(channel):
    return pb_grpc.EmbeddingServiceStub(channel)


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
    norms = np.frombuffer(base64.b64decode(resp.headers["x-arcface-norms"]), "<f4")
    as_json = requests.post(main_url + "/v1/embed", data=encode_npy(faces[:5]),
                            headers={"content-type": NPY_MEDIA_TYPE}, timeout=60).json()
    np.testing.assert_allclose(norms, as_json["norms"], rtol=1e-5)


def test_base64_answers_are_the_json_answers_float32_bytes(main_url, faces):
    """``?encoding=base64``, for a .npy and for a JSON body: the same floats as the lists of
    numbers of the default answer; an unknown encoding is refused before any work."""
    npy = {"data": encode_npy(faces[:4]), "headers": {"content-type": NPY_MEDIA_TYPE}}
    plain = requests.post(main_url + "/v1/embed", timeout=60, **npy).json()
    for body in (npy, {"json": {"crops": [base64.b64encode(f.tobytes()).decode() for f in faces[:4]]}}):
        packed = requests.post(main_url + "/v1/embed?encoding=base64", timeout=60, **body)
        assert packed.status_code == 200, packed.text
        answer = packed.json()
        assert answer["encoding"] == "base64" and answer["contract"] == plain["contract"]
        values = np.frombuffer(base64.b64decode(answer["embeddings"]), "<f4").reshape(4, answer["dim"])
        np.testing.assert_allclose(values, np.asarray(plain["embeddings"], np.float32), atol=1e-6)
        np.testing.assert_allclose(answer["norms"], plain["norms"], rtol=1e-5)
    wrong = requests.post(main_url + "/v1/embed?encoding=msgpack", timeout=60, **npy)
    assert wrong.status_code == 422 and wrong.json()["error"]["reason"] == "bad_request"
    assert "unknown encoding 'msgpack'" in wrong.json()["error"]["message"]


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


def test_raw_crops_are_taken_where_declared(main_url, engine, faces):
    """JSON ``crops`` and ``/v1/compare`` ``crop``: raw (112, 112, 3) BGR bytes, explicitly."""
    body = {"crops": [base64.b64encode(f.tobytes()).decode() for f in faces[:3]]}
    resp = requests.post(main_url + "/v1/embed", json=body, timeout=60)
    assert resp.status_code == 200, resp.text
    assert _cos(resp.json()["embeddings"], engine.encode(faces[:3])).min() >= 0.99999
    emb = engine.encode(faces[:2])
    side = {"crop": base64.b64encode(faces[0].tobytes()).decode()}
    same = requests.post(main_url + "/v1/compare", json={"a": side, "b": {"embedding": emb[0].tolist()}},
                         timeout=60)
    assert same.status_code == 200 and same.json()["cosine"] > 0.9999, same.text


def test_grpc_embed_batch_and_health(main_url, stub, engine, faces):
    resp = stub.EmbedBatch(pb.EmbedBatchRequest(crops=faces[:4].tobytes()), metadata=GRPC_META, timeout=60)
    got = np.array([e.values for e in resp.embeddings])
    assert got.shape == (4, 512) and resp.contract == engine.info.contract
    assert _cos(got, engine.encode(faces[:4])).min() >= 0.99999
    pngs = [pb.Face(image=cv2.imencode(".png", f)[1].tobytes()) for f in faces[:2]]
    encoded = pb.EmbedBatchRequest(faces=pngs)
    got = np.array([e.values for e in stub.EmbedBatch(encoded, metadata=GRPC_META, timeout=60).embeddings])
    assert _cos(got, engine.encode(faces[:2])).min() >= 0.99999
    one = stub.Embed(pb.EmbedRequest(face=pb.Face(crop=faces[0].tobytes())), metadata=GRPC_META, timeout=60)
    assert len(one.embeddings) == 1 and one.embeddings[0].norm > 0
    assert _cos([one.embeddings[0].values], engine.encode(faces[:1])).min() >= 0.99999
    raw = [pb.Face(crop=f.tobytes()) for f in faces[2:4]]  # raw crops, declared, in a batch
    got = np.array([e.values for e in stub.EmbedBatch(pb.EmbedBatchRequest(faces=raw), metadata=GRPC_META,
                                                       timeout=60).embeddings])
    assert _cos(got, engine.encode(faces[2:4])).min() >= 0.99999
    health = stub.Health(pb.HealthRequest(), metadata=GRPC_META, timeout=30)
    assert health.status == "ok" and health.backend == "onnx"


def test_grpc_packed_answers_equal_the_repeated_ones_and_the_engine(main_url, stub, engine, faces):
    """PACKED (one bytes field) carries what REPEATED (one message per face, still the default)
    does; each answer fills only its own fields and says its encoding."""
    expected = engine.encode(faces[:5])
    default = stub.EmbedBatch(pb.EmbedBatchRequest(crops=faces[:5].tobytes()), metadata=GRPC_META, timeout=60)
    assert default.encoding == pb.REPEATED and len(default.embeddings) == 5
    assert default.embeddings_f32 == b"" and len(default.norms) == 0
    packed = stub.EmbedBatch(pb.EmbedBatchRequest(crops=faces[:5].tobytes(), encoding=pb.PACKED),
                             metadata=GRPC_META, timeout=60)
    assert packed.encoding == pb.PACKED and len(packed.embeddings) == 0
    assert len(packed.embeddings_f32) == 5 * packed.dim * 4 and len(packed.norms) == 5
    got = np.frombuffer(packed.embeddings_f32, "<f4").reshape(5, packed.dim)
    repeated = np.array([e.values for e in default.embeddings], np.float32)
    assert _cos(got, repeated).min() >= 0.99999 and _cos(got, expected).min() >= 0.99999
    np.testing.assert_allclose(packed.norms, [e.norm for e in default.embeddings], rtol=1e-4)
    assert (packed.dim, packed.contract) == (default.dim, default.contract) == (512, engine.info.contract)
    one = stub.Embed(pb.EmbedRequest(face=pb.Face(crop=faces[0].tobytes()), encoding=pb.PACKED),
                     metadata=GRPC_META, timeout=60)
    assert one.encoding == pb.PACKED and len(one.norms) == 1 and one.norms[0] > 0
    assert _cos(np.frombuffer(one.embeddings_f32, "<f4").reshape(1, 512), expected[:1]).min() >= 0.99999


@pytest.mark.parametrize("method", ["Embed", "EmbedBatch"])
def test_grpc_unknown_answer_encoding_is_invalid_argument(main_url, channel, stub, faces, method):
    """proto3 enums are open: a value this service does not write is refused, not answered in
    another encoding than asked."""
    face = pb.Face(crop=faces[0].tobytes())
    request = pb.EmbedRequest(face=face, encoding=7) if method == "Embed" else pb.EmbedBatchRequest(
        faces=[face], encoding=7)
    with pytest.raises(grpc.RpcError) as info:
        _grpc_call(channel, method, request)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details() == "bad_request: 'encoding' must be one of REPEATED (0), PACKED (1), got 7"
    ok = stub.EmbedBatch(pb.EmbedBatchRequest(crops=faces[:1].tobytes()), metadata=GRPC_META, timeout=30)
    assert len(ok.embeddings) == 1


def test_identify_without_a_gallery_is_failed_precondition_no_gallery(main_url, stub, faces):
    """HTTP 409 ``no_gallery`` and its gRPC twin, ``FAILED_PRECONDITION`` with our reason (was
    ``bad_request: no_gallery``: the reason was missing from the table)."""
    crop = base64.b64encode(faces[0].tobytes()).decode()
    resp = requests.post(main_url + "/v1/identify", json={"crops": [crop]}, timeout=60)
    assert resp.status_code == 409 and resp.json()["error"]["reason"] == "no_gallery", resp.text
    with pytest.raises(grpc.RpcError) as info:
        stub.Identify(pb.IdentifyRequest(crops=faces[:1].tobytes()), metadata=GRPC_META, timeout=60)
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert info.value.details().startswith("no_gallery: this service has no gallery"), info.value.details()


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


def _b64_raw(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _images(*data: bytes, landmarks: bool = False) -> dict:
    body = {"images": [_b64_raw(d) for d in data]}
    if landmarks:
        body["landmarks"] = [_KPS] * len(data)
    else:
        body["aligned"] = True
    return {"json": body}


_HDR_13K = hostile.hdr_rle(13000, 13000)  # a valid 13000x13000 Radiance HDR: 10.8 MB, 5 GB decoded
_RAW_CROP = source_faces()[0].crop.tobytes()  # 37632 raw bytes, sent as if it were an image


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
    # 6: formats outside the allow-list, whatever the size they declare, on every path
    ("radiance hdr 13000x13000", "/v1/embed", _images(_HDR_13K), 415, "unsupported_format"),
    ("radiance hdr with landmarks", "/v1/embed", _images(_HDR_13K[:4096], landmarks=True), 415,
     "unsupported_format"),
    ("pfm 20000x20000", "/v1/embed", _images(hostile.pfm(20000, 20000)), 415, "unsupported_format"),
    ("pam 20000x20000", "/v1/embed", _images(hostile.pam(20000, 20000)), 415, "unsupported_format"),
    ("compare: radiance hdr", "/v1/compare",
     {"json": {"a": {"image": _b64_raw(_HDR_13K[:4096])}, "b": {"embedding": [1.0] * 512}}}, 415,
     "unsupported_format"),
    ("compare: png bomb", "/v1/compare",
     {"json": {"a": {"image": _b64_raw(png_bomb(30000, 30000))}, "b": {"embedding": [1.0] * 512}}}, 413,
     "image_too_large"),
    # 7: decode work per request: 256 truncated JPEGs declaring 6000x6000 each (9.2 gigapixels)
    ("256 truncated 6000x6000 jpegs", "/v1/embed", _images(*[hostile.truncated_jpeg()] * 256, landmarks=True),
     413, "request_too_large"),
    ("3 flat 6000x6000 pngs", "/v1/embed", _images(*[hostile.flat_png()] * 3), 413, "request_too_large"),
    # 8: what OpenCV raises on, lone surrogates, non-string contracts, unknown routes and methods
    ("bmp opencv raises on", "/v1/embed", _images(hostile.bmp_opencv_raises_on()), 422, "not_an_image"),
    ("compare: lone surrogate contract", "/v1/compare",
     _json_raw({"a": {"embedding": [1.0] * 512}, "b": {"embedding": [1.0] * 512}, "contract": "\ud800"}),
     409, "contract_mismatch"),
    ("compare: contract not a string", "/v1/compare",
     {"json": {"a": {"embedding": [1.0] * 512}, "b": {"embedding": [1.0] * 512}, "contract": [1]}}, 422,
     "bad_request"),
    ("lone surrogate in base64", "/v1/embed", _json_raw({"images": ["\udfff"], "aligned": True}), 400,
     "bad_base64"),
    ("lone surrogate field name", "/v1/embed", _json_raw({"images": ["x"], "\ud800": 1}), 422, "bad_request"),
    ("invalid utf-8 body", "/v1/embed", {"data": b'{"images": ["\xff\xfe"]}',
                                         "headers": {"content-type": "application/json"}}, 400, "bad_json"),
    # 9: raw pixels are never guessed from a length
    ("raw crop bytes as an image", "/v1/embed", _images(_RAW_CROP), 422, "not_an_image"),
    ("gif of raw-crop size", "/v1/embed", _images(hostile.gif_of_raw_crop_size()), 415, "unsupported_format"),
    ("crop of the wrong size", "/v1/embed", {"json": {"crops": [_b64_raw(_RAW_CROP[:-1])]}}, 422, "bad_crop"),
    ("crops with landmarks", "/v1/embed",
     {"json": {"crops": [_b64_raw(_RAW_CROP)], "landmarks": [_KPS]}}, 422, "bad_request"),
    ("compare: crop of the wrong size", "/v1/compare",
     {"json": {"a": {"crop": _b64_raw(b"\x00" * 100)}, "b": {"embedding": [1.0] * 512}}}, 422, "bad_crop"),
    # 13: no content type, or one a cross-site form can send, is refused before any work
    ("no content type", "/v1/embed", {"data": json.dumps({"images": [_b64(_PHOTO.crop)]}).encode()}, 415,
     "unsupported_media_type"),
    ("form content type", "/v1/embed", {"data": {"images": "x"}}, 415, "unsupported_media_type"),
    ("compare: no content type", "/v1/compare",
     {"data": json.dumps({"a": {"embedding": [1.0] * 512}, "b": {"embedding": [1.0] * 512}}).encode()}, 415,
     "unsupported_media_type"),
]

# words that would mean an error leaked internals (a traceback, a source path, a process)
LEAKS = ("Traceback", 'File "', "/site-packages/", "/work/", ".py", "pid=", "ray::", "RayActorError")


def assert_no_leak(text: str) -> None:
    for word in LEAKS:
        assert word not in text, f"error leaks {word!r}: {text[:500]}"


@pytest.mark.parametrize(
    ("path", "kwargs", "status", "reason"), [c[1:] for c in BAD_REQUESTS], ids=[c[0] for c in BAD_REQUESTS]
)
def test_bad_input_gets_a_precise_4xx_and_service_stays_up(main_url, faces, path, kwargs, status, reason):
    resp = requests.post(main_url + path, timeout=60, **kwargs)
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"] == "application/json"
    error = resp.json()["error"]
    assert (error["status"], error["reason"]) == (status, reason) and len(error["message"]) > 10
    assert_no_leak(resp.text)
    good = requests.post(main_url + "/v1/embed", data=encode_npy(faces[:1]),
                         headers={"content-type": NPY_MEDIA_TYPE}, timeout=60)
    assert good.status_code == 200


def assert_recovers(url: str, within_s: float = 20.0, **kwargs) -> requests.Response:
    """After an overload, a client that honours Retry-After gets its 200 within ``within_s``.
    Right after the burst the proxy's shedder may still refuse (its window remembers the
    refusals, README "Overload"): every refusal until then must be a retryable 503."""
    deadline = time.monotonic() + within_s
    while True:
        resp = requests.post(url, timeout=60, **kwargs)
        if resp.status_code == 200 or time.monotonic() > deadline:
            assert resp.status_code == 200, resp.text
            return resp
        assert_retryable_503(resp, ("overloaded", "queue_timeout"))
        time.sleep(min(float(resp.headers["retry-after"]), 2.0))


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


def _grpc_call(channel, method: str, request, timeout: float = 60):
    """Call ``method`` with a message or with raw bytes (what a broken client sends)."""
    serializer = None if isinstance(request, bytes) else type(request).SerializeToString
    call = channel.unary_unary(f"/arcface.v1.EmbeddingService/{method}", request_serializer=serializer,
                               response_deserializer=pb.EmbedResponse.FromString)
    return call(request, metadata=GRPC_META, timeout=timeout)


_GOOD_FACE = pb.Face(image=cv2.imencode(".png", _PHOTO.crop)[1].tobytes())
_CODE = grpc.StatusCode

# (id, method, request (message or raw bytes), status code, reason)
BAD_GRPC_INPUT = [
    ("hdr 20000x20000", "Embed",
     pb.EmbedRequest(face=pb.Face(image=hostile.hdr_rle(20000, 20000, rows=8))),
     _CODE.INVALID_ARGUMENT, "unsupported_format"),
    ("hdr 13000x13000 whole file", "EmbedBatch",
     pb.EmbedBatchRequest(faces=[_GOOD_FACE, pb.Face(image=_HDR_13K)]), _CODE.INVALID_ARGUMENT,
     "unsupported_format"),
    ("pfm", "Embed", pb.EmbedRequest(face=pb.Face(image=hostile.pfm(20000, 20000))), _CODE.INVALID_ARGUMENT,
     "unsupported_format"),
    ("bmp opencv raises on", "Embed", pb.EmbedRequest(face=pb.Face(image=hostile.bmp_opencv_raises_on())),
     _CODE.INVALID_ARGUMENT, "not_an_image"),
    ("256 truncated 6000x6000 jpegs", "EmbedBatch",
     pb.EmbedBatchRequest(faces=[pb.Face(image=hostile.truncated_jpeg())] * 256), _CODE.RESOURCE_EXHAUSTED,
     "request_too_large"),
    ("raw crop bytes as an image", "Embed", pb.EmbedRequest(face=pb.Face(image=_RAW_CROP)),
     _CODE.INVALID_ARGUMENT, "not_an_image"),
    ("gif of raw-crop size", "Embed", pb.EmbedRequest(face=pb.Face(image=hostile.gif_of_raw_crop_size())),
     _CODE.INVALID_ARGUMENT, "unsupported_format"),
    ("crop of the wrong size", "EmbedBatch", pb.EmbedBatchRequest(faces=[pb.Face(crop=_RAW_CROP[:100])]),
     _CODE.INVALID_ARGUMENT, "bad_crop"),
    ("image and crop", "Embed", pb.EmbedRequest(face=pb.Face(image=_GOOD_FACE.image, crop=_RAW_CROP)),
     _CODE.INVALID_ARGUMENT, "bad_request"),
    ("crop with landmarks", "Embed",
     pb.EmbedRequest(face=pb.Face(crop=_RAW_CROP, landmarks=np.ravel(_KPS).tolist())),
     _CODE.INVALID_ARGUMENT, "bad_request"),
    ("no face", "Embed", pb.EmbedRequest(), _CODE.INVALID_ARGUMENT, "not_an_image"),
    ("malformed protobuf", "EmbedBatch", b"\xff\xff\xff\xff", _CODE.INVALID_ARGUMENT, "bad_protobuf"),
    ("truncated protobuf", "Embed", pb.EmbedRequest(face=_GOOD_FACE).SerializeToString()[:-7],
     _CODE.INVALID_ARGUMENT, "bad_protobuf"),
    ("length past the end", "EmbedBatch", b"\x0a\x7f\x0a\x02", _CODE.INVALID_ARGUMENT, "bad_protobuf"),
]


@pytest.mark.parametrize(("method", "request_", "code", "reason"), [c[1:] for c in BAD_GRPC_INPUT],
                         ids=[c[0] for c in BAD_GRPC_INPUT])
def test_grpc_bad_input_gets_its_status_in_our_format(main_url, channel, stub, faces, method, request_, code,
                                                      reason):
    with pytest.raises(grpc.RpcError) as info:
        _grpc_call(channel, method, request_)
    assert info.value.code() == code, info.value.details()
    assert info.value.details().startswith(f"{reason}: "), info.value.details()
    assert_no_leak(info.value.details())
    ok = stub.EmbedBatch(pb.EmbedBatchRequest(crops=faces[:1].tobytes()), metadata=GRPC_META, timeout=30)
    assert len(ok.embeddings) == 1


@pytest.fixture(scope="module")
def small_app(serve_endpoints) -> str:
    """An application whose replicas refuse bodies over 100 KiB (deployed once for both tests
    that need it: each deploy starts a replica)."""
    deploy("small", {"max_body_mb": 0.1})
    return "small"


def test_grpc_messages_over_max_body_are_refused_by_the_proxy_and_the_replica(serve_endpoints, channel, stub,
                                                                             faces, small_app):
    """The proxy's gRPC limit is max_body_mb (16 MB, not Serve's 2 GiB): a 17 MB message never
    reaches a replica; a replica with a smaller max_body_mb refuses what is over it."""
    big = pb.EmbedBatchRequest(crops=b"\x00" * (17 << 20))
    with pytest.raises(grpc.RpcError) as info:
        stub.EmbedBatch(big, metadata=GRPC_META, timeout=60)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, info.value.details()
    assert not info.value.details().startswith("body_too_large"), "the replica, not the proxy, refused it"
    small = (("application", small_app),)
    with pytest.raises(grpc.RpcError) as info:
        stub.EmbedBatch(pb.EmbedBatchRequest(crops=faces[:8].tobytes()), metadata=small, timeout=60)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert info.value.details().startswith("body_too_large: ")
    ok = stub.EmbedBatch(pb.EmbedBatchRequest(crops=faces[:1].tobytes()), metadata=small, timeout=30)
    assert len(ok.embeddings) == 1
    ok = stub.EmbedBatch(pb.EmbedBatchRequest(crops=faces[:1].tobytes()), metadata=GRPC_META, timeout=30)
    assert len(ok.embeddings) == 1


def test_unknown_routes_and_methods_answer_in_our_shape(serve_endpoints, main_url):
    for url, method, status, reason in [
        (serve_endpoints.http + "/no-such-app/v1/embed", "post", 404, "not_found"),  # the proxy's 404
        (main_url + "/v1/nothing", "get", 404, "not_found"),  # the app's own
        (main_url + "/v1/embed", "get", 405, "method_not_allowed"),
    ]:
        resp = getattr(requests, method)(url, timeout=30)
        assert resp.status_code == status, resp.text
        assert resp.headers["content-type"] == "application/json"
        assert resp.json()["error"]["reason"] == reason
        assert_no_leak(resp.text)


def test_oversized_body_is_refused(serve_endpoints, faces, small_app):
    url = f"{serve_endpoints.http}/{small_app}/v1/embed"
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
    anonymous = requests.get(serve_endpoints.http + "/secure/healthz", timeout=30)
    assert anonymous.status_code == 200 and anonymous.json() == {"status": "ok"}  # liveness, nothing more
    known = requests.get(serve_endpoints.http + "/secure/healthz", timeout=30,
                         headers={"authorization": "Bearer correct horse battery staple"}).json()
    assert known["status"] == "ok" and known["backend"] == "onnx" and "contract" in known
    assert requests.get(serve_endpoints.http + "/secure/v1/info", timeout=30).status_code == 401
    health = stub.Health(pb.HealthRequest(), timeout=30, metadata=(("application", "secure"),))
    assert health.status == "ok" and health.backend == "" and health.contract == ""
    with pytest.raises(grpc.RpcError) as info:
        stub.EmbedBatch(pb.EmbedBatchRequest(crops=faces[:1].tobytes()), timeout=30,
                        metadata=(("application", "secure"),))
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    ok = stub.EmbedBatch(pb.EmbedBatchRequest(crops=faces[:1].tobytes()), timeout=30, metadata=(
        ("application", "secure"), ("authorization", "Bearer correct horse battery staple")))
    assert len(ok.embeddings) == 1


def _post(url: str, **kwargs) -> tuple[requests.Response, float]:
    started = time.perf_counter()
    resp = requests.post(url, timeout=120, **kwargs)
    return resp, time.perf_counter() - started


def assert_retryable_503(resp: requests.Response, reasons: tuple[str, ...]) -> None:
    assert resp.status_code == 503 and resp.headers["content-type"] == "application/json", resp.text
    assert resp.json()["error"]["reason"] in reasons, resp.text
    assert int(resp.headers["retry-after"]) >= 1
    assert_no_leak(resp.text)


def test_heavy_requests_do_not_starve_an_unrelated_one(serve_endpoints):
    """Two requests of 12 real 6000x6000 decodes each (admitted here: the per-request budget is
    raised) hold both decode threads for seconds; a one-image request sent after them takes its
    turn between their images instead of waiting for one of them to finish."""
    deploy("fair", {"max_request_megapixels": 1000, "max_queue_wait_s": 60, "decode_threads": 2})
    url = serve_endpoints.http + "/fair/v1/embed"
    heavy = {"json": {"images": [_b64_raw(hostile.flat_png())] * 12, "landmarks": [_KPS] * 12}}
    with ThreadPoolExecutor(3) as pool:
        heavies = [pool.submit(_post, url, **heavy) for _ in range(2)]
        time.sleep(0.5)  # both are decoding
        light, light_s = pool.submit(_post, url, json={"images": [_b64(_PHOTO.crop)]}).result()
        done = [f.result() for f in heavies]
    assert light.status_code == 200 and all(r.status_code == 200 for r, _ in done), light.text
    # fair turns: it waited for at most the two images running and one more of each (about a
    # 6th of a heavy request); first come, first served it would wait for a whole heavy request
    assert light_s < 0.5 * min(s for _, s in done), (light_s, [s for _, s in done])


def test_the_replica_queue_is_bounded_in_time(serve_endpoints, faces):
    """Far more work than the replica can start within max_queue_wait_s: the rest get 503 at
    once (our shape, Retry-After), and no admitted request waited longer than the bound."""
    deploy("bounded", {"max_queue_wait_s": 0.3})
    url = serve_endpoints.http + "/bounded"
    heavy = encode_npy(np.repeat(faces, 13, axis=0)[:256])
    with ThreadPoolExecutor(24) as pool:
        results = list(pool.map(lambda _: _post(url + "/v1/embed", data=heavy,
                                                headers={"content-type": NPY_MEDIA_TYPE}), range(48)))
    codes = [r.status_code for r, _ in results]
    assert 503 in codes and 200 in codes, codes
    for resp, _ in results:
        if resp.status_code == 503:
            assert_retryable_503(resp, ("overloaded", "queue_timeout"))
    admission = requests.get(url + "/v1/info", timeout=30).json()["service"]["admission"]
    assert admission["max_start_wait_s"] <= 0.3, admission
    by_replica = [r for r, _ in results if r.status_code == 503 and "x-arcface-shed" not in r.headers]
    assert admission["rejected_overloaded"] + admission["dropped_queue_timeout"] == len(by_replica)
    assert_recovers(url + "/v1/embed", data=encode_npy(faces[:2]), headers={"content-type": NPY_MEDIA_TYPE})


def test_require_auth_without_a_token_refuses_to_start(serve_endpoints):
    from ray import serve

    with pytest.raises(RuntimeError, match="Deploying application open failed"):
        deploy("open", {"require_auth": True, "auth_token_env": "ARCFACE_TEST_UNSET_TOKEN"},
               max_constructor_retry_count=1)
    status = serve.status().applications["open"].deployments["EmbeddingDeployment"]
    assert "require_auth is true but there is no token" in status.message, status.message
    serve.delete("open")


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
        return resp.status_code, time.perf_counter() - started, resp

    with ThreadPoolExecutor(12) as pool:
        results = list(pool.map(one, range(12)))
    codes = [c for c, _, _ in results]
    assert 503 in codes and 200 in codes, codes
    assert max(t for c, t, _ in results if c == 503) < min(t for c, t, _ in results if c == 200) + 1.0
    for code, _, resp in results:  # Serve's proxy refused these: still our shape, with Retry-After
        if code == 503:
            assert_retryable_503(resp, ("overloaded",))
    assert_recovers(url + "/v1/embed", data=encode_npy(faces[:2]), headers={"content-type": NPY_MEDIA_TYPE})
    after = requests.get(url + "/v1/info", timeout=30).json()["service"]
    assert after["replica"] == before["replica"] and after["pid"] == before["pid"]
