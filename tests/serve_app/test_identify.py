"""1:N identify on a real local Serve: HTTP and gRPC, the batch queue, a gallery reloaded live."""

from __future__ import annotations

import base64
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
import requests
from identity_faces import THRESHOLD, enroll_jitters, jitters
from support import deploy_from_config

from engines import ConfigError, get_engine, source_faces
from engines.config.schema import StorageConfig
from engines.identity.gallery import open_gallery_store
from serve_app.errors import RequestError
from serve_app.identify import GalleryHolder
from serve_app.protos import embedding_pb2 as pb
from serve_app.protos import embedding_pb2_grpc as pb_grpc
from serve_app.timing import TIMING_HEADERS

pytestmark = pytest.mark.integration

APP = "ident"
ENROLLED = range(6)
STRANGER = 6  # Tom Hanks: enrolled only by the reload test
USER_CONFIG = {"max_batch_size": 16, "batch_wait_timeout_s": 0.05}


@pytest.fixture(scope="module")
def engine():
    return get_engine("onnx", "synthetic:mobilefacenet", device="cpu")


@pytest.fixture(scope="module")
def service(serve_endpoints, engine, tmp_path_factory):
    info = engine.info
    root = tmp_path_factory.mktemp("serve")
    store = open_gallery_store(str(root / "gallery"), info.contract, info.model_id, info.embedding_dim)
    enroll_jitters(engine, store, ENROLLED)
    deploy_from_config(APP, {**USER_CONFIG, "gallery_reload": 0},
                       args={"gallery": store.uri, "max_queue_wait_s": 30})
    return serve_endpoints.http + f"/{APP}", store


def _crops_body(crops: np.ndarray, **extra) -> dict:
    return {"crops": [base64.b64encode(c.tobytes()).decode() for c in crops], **extra}


def _probes() -> tuple[np.ndarray, list[str]]:
    crops = np.concatenate([jitters(i, 1, seed=900 + i) for i in [*ENROLLED, STRANGER]])
    return crops, [source_faces()[i].name for i in ENROLLED] + ["unknown"]


def test_http_identify_names_held_out_jitters_and_a_stranger_is_unknown(service):
    url, _ = service
    crops, expected = _probes()
    body = _crops_body(crops, threshold=THRESHOLD, top_k=3)
    resp = requests.post(url + "/v1/identify", json=body, timeout=60)
    assert resp.status_code == 200, resp.text
    timing = {k: float(resp.headers[k]) for k in TIMING_HEADERS}  # identify is timed as embed is
    assert timing["x-batch-faces"] >= 1 and timing["x-compute-time"] > 0, timing
    body = resp.json()
    assert [r["identity"] for r in body["results"]] == expected
    assert [r["match"] for r in body["results"]] == [True] * 6 + [False]
    assert all(len(r["candidates"]) == 3 for r in body["results"])
    assert body["gallery_identities"] == 6 and body["threshold"] == THRESHOLD
    for bad, fragment in (({"top_k": 0}, "top_k"), ({"threshold": "high"}, "threshold"),
                          ({"oops": 1}, "unknown field")):
        resp = requests.post(url + "/v1/identify", json=_crops_body(crops[:1], **bad), timeout=60)
        assert resp.status_code == 422 and fragment in resp.text, resp.text
    assert requests.post(url + "/v1/identify", data=b"x", headers={"content-type": "text/plain"},
                         timeout=60).status_code == 415


def test_grpc_identify(service, serve_endpoints):
    crops, expected = _probes()
    with grpc.insecure_channel(serve_endpoints.grpc) as channel:
        stub = pb_grpc.EmbeddingServiceStub(channel)
        resp, call = stub.Identify.with_call(
            pb.IdentifyRequest(crops=crops.tobytes(), threshold=THRESHOLD, top_k=2),
            metadata=(("application", APP),), timeout=60)
        trailing = dict(call.trailing_metadata())
        assert set(TIMING_HEADERS) <= set(trailing) and float(trailing["x-compute-time"]) > 0, trailing
        assert [r.identity for r in resp.results] == expected
        assert all(len(r.candidates) == 2 for r in resp.results) and resp.gallery_identities == 6
        with pytest.raises(grpc.RpcError) as err:
            stub.Identify(pb.IdentifyRequest(crops=b"\0" * 10), metadata=(("application", APP),), timeout=60)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_identify_under_concurrent_load_goes_through_the_batch_queue(service):
    url, _ = service
    crops, expected = _probes()
    before = requests.get(url + "/v1/info", timeout=30).json()["batch_stats"]

    def one(i):
        # The proxy's shedder counts a burst's in-flight requests before any is answered and may
        # refuse some (503, x-arcface-shed: proxy, never reaching a replica): retry those, as told.
        body = _crops_body(crops[i % 7][None], threshold=THRESHOLD)
        for _ in range(50):
            resp = requests.post(url + "/v1/identify", json=body, timeout=120)
            if resp.status_code != 503 or resp.headers.get("x-arcface-shed") != "proxy":
                break
            time.sleep(0.2)
        return resp.status_code, resp.json()["results"][0]["identity"] if resp.ok else resp.text

    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(one, range(42)))
    assert answers == [(200, expected[i % 7]) for i in range(42)]
    after = requests.get(url + "/v1/info", timeout=30).json()["batch_stats"]
    assert after["faces"] - before["faces"] == 42
    assert after["batches"] - before["batches"] < 42, "every identify ran alone: not through the batch queue"


def test_a_new_gallery_version_is_picked_up_without_a_restart(service, engine):
    url, store = service
    stranger = jitters(STRANGER, 1, seed=906)
    before = requests.get(url + "/v1/info", timeout=30).json()["service"]
    enroll_jitters(engine, store, [STRANGER], seed=40)
    deploy_from_config(APP, {**USER_CONFIG, "gallery_reload": 1}, args={"gallery": store.uri,
                                                                        "max_queue_wait_s": 30})
    deadline = time.monotonic() + 60
    while True:
        body = requests.post(url + "/v1/identify", json=_crops_body(stranger, threshold=THRESHOLD),
                             timeout=60).json()
        if body["results"][0]["identity"] != "unknown" or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert body["results"][0]["identity"] == source_faces()[STRANGER].name and body["gallery_identities"] == 7
    after = requests.get(url + "/v1/info", timeout=30).json()["service"]
    assert (after["replica"], after["pid"]) == (before["replica"], before["pid"]), "replica restarted"


def test_a_replica_refuses_another_contracts_gallery_and_answers_409_without_one(service):
    _, store = service
    with pytest.raises(ConfigError) as err:
        GalleryHolder(store.uri, "arcemb-v1-othermodel", 512, StorageConfig())
    assert "arcemb-v1-othermodel" in str(err.value) and store.contract in str(err.value)
    with pytest.raises(RequestError) as none:
        GalleryHolder(None, store.contract, 512, StorageConfig()).current()
    assert none.value.status == 409
