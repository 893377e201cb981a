"""``serve_app.client`` against a running service: transports, splitting, the contract check,
retries on 503 (proven by filling the replica's queue) and the gRPC helper."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import cv2
import numpy as np
import pytest
import requests
from support import deploy

from engines.models.sample_faces import source_faces
from serve_app.client import (
    AsyncEmbeddingClient,
    ContractMismatch,
    EmbeddingClient,
    GrpcEmbeddingClient,
    RetryPolicy,
    ServiceError,
)
from serve_app.codec import NPY_MEDIA_TYPE, encode_npy

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def url(serve_endpoints):
    deploy("cli", {"max_queue_wait_s": 30, "max_faces_per_request": 4},
           user_config={"max_batch_size": 16, "batch_wait_timeout_s": 0.01})
    return serve_endpoints.http + "/cli"


def _cos(a, b) -> np.ndarray:
    return (np.asarray(a) * np.asarray(b)).sum(1)


def _chunks_served(url: str) -> int:
    return requests.get(url + "/v1/info", timeout=30).json()["batch_stats"]["chunks"]


def test_sync_client_splits_large_arrays_and_matches_the_engine(url, engine, faces):
    crops = faces[:10]
    refused = requests.post(url + "/v1/embed", data=encode_npy(crops),
                            headers={"content-type": NPY_MEDIA_TYPE}, timeout=60)
    assert refused.status_code == 413 and refused.json()["error"]["reason"] == "too_many_faces"
    before = _chunks_served(url)
    with EmbeddingClient(url) as client:
        embeddings, norms, contract = client.embed(crops)
        assert client.max_faces == 4  # read from /v1/info
        assert set(client.last_timing) >= {"x-queue-time", "x-compute-time", "x-total-time", "x-batch-faces"}
    assert _chunks_served(url) - before == 3  # 4 + 4 + 2 faces
    assert embeddings.shape == (10, 512) and norms.shape == (10,) and (norms > 0).all()
    assert contract == engine.info.contract
    assert _cos(embeddings, engine.encode(crops)).min() >= 0.99999


@pytest.mark.parametrize(("transport", "accept"), [("json", "json"), ("npy", "npy"), ("json", "npy"),
                                                   ("npy", "base64"), ("json", "base64")])
def test_transports_and_answer_encodings(url, engine, faces, transport, accept):
    """Every body and answer encoding: the engine's embeddings, and the norms with each answer
    (the .npy answer's in a header)."""
    with EmbeddingClient(url, transport=transport, accept=accept) as client:
        result = client.embed(faces[:6])
    assert _cos(result.embeddings, engine.encode(faces[:6])).min() >= 0.99999
    _, norms = engine.encode_with_norms(faces[:6])
    np.testing.assert_allclose(result.norms, norms, rtol=1e-4)


def test_images_with_landmarks_as_json_and_multipart(url, engine):
    t1 = [f for f in source_faces() if f.image_file == "t1.jpg"][:5]
    png = cv2.imencode(".png", t1[0].image)[1].tobytes()
    expected = engine.encode(np.stack([f.crop for f in t1]))
    with EmbeddingClient(url) as client:
        for transport in ("json", "multipart"):
            got = client.embed_images([png] * len(t1), landmarks=[f.landmarks for f in t1],
                                      transport=transport)
            assert got.embeddings.shape == (5, 512)  # 5 faces: two requests of at most 4
            assert _cos(got.embeddings, expected).min() >= 0.99999, transport


def test_async_client(url, engine, faces):
    async def main():
        async with AsyncEmbeddingClient(url) as client:
            results = await asyncio.gather(*(client.embed(faces[i : i + 5]) for i in range(0, 15, 5)))
            images = await client.embed_images([cv2.imencode(".png", f)[1].tobytes() for f in faces[:2]],
                                               transport="multipart")
            return results, images

    results, images = asyncio.run(main())
    got = np.concatenate([r.embeddings for r in results])
    assert _cos(got, engine.encode(faces[:15])).min() >= 0.99999
    assert _cos(images.embeddings, engine.encode(faces[:2])).min() >= 0.99999


def test_a_contract_other_than_the_expected_one_is_refused(url, serve_endpoints, engine, faces):
    with EmbeddingClient(url, expected_contract="arcemb-v1-another-model") as client:
        with pytest.raises(ContractMismatch, match="arcemb-v1-another-model"):
            client.embed(faces[:2])
        with pytest.raises(ServiceError) as info:  # the expected contract goes with a comparison
            client.compare({"embedding": [1.0, 0.0]}, {"embedding": [0.0, 1.0]})
        assert info.value.status == 409 and info.value.reason == "contract_mismatch"
    with EmbeddingClient(url) as client:  # no expectation: pinned to what the service first says
        client.embed(faces[:1])
        assert client.expected_contract == engine.info.contract
        same = client.compare({"embedding": [1.0] * 512}, {"embedding": [1.0] * 512})
        assert same["same_person"] is True
    grpc_client = GrpcEmbeddingClient(serve_endpoints.grpc, application="cli", expected_contract="other")
    with grpc_client, pytest.raises(ContractMismatch):
        grpc_client.embed(faces[:1])


@pytest.mark.parametrize("encoding", ["packed", "repeated"])
def test_grpc_client(url, serve_endpoints, engine, faces, encoding):
    with GrpcEmbeddingClient(serve_endpoints.grpc, application="cli", max_faces_per_request=4,
                             encoding=encoding) as client:
        embeddings, norms, contract = client.embed(faces[:9])  # 4 + 4 + 1 faces
        assert set(client.last_timing) >= {"x-queue-time", "x-compute-time", "x-batch-faces"}
        single = client.embed(faces[:1])
        one = client.embed_image(cv2.imencode(".png", faces[0])[1].tobytes())
    assert contract == engine.info.contract
    assert embeddings.shape == (9, 512) and norms.shape == (9,) and (norms > 0).all()
    assert single.embeddings.shape == (1, 512) and single.norms.shape == (1,)
    assert one.embeddings.shape == (1, 512) and one.norms.shape == (1,)
    assert _cos(embeddings, engine.encode(faces[:9])).min() >= 0.99999
    assert _cos(single.embeddings, engine.encode(faces[:1])).min() >= 0.99999
    assert _cos(one.embeddings, engine.encode(faces[:1])).min() >= 0.99999


def test_bench_serve_over_grpc_measures_the_shell(url, serve_endpoints, capsys):
    """``arcface bench-serve --transport grpc`` against the running service, in this process: its
    Ray is this process's tree, so the shell's CPU is seen by role as with ``--start``."""
    from engines.cli import main

    rc = main(["bench-serve", "--url", url, "--transport", "grpc", "--grpc-target", serve_endpoints.grpc,
               "--application", "cli", "--grpc-channels", "2", "--concurrency", "4", "--faces-per-request",
               "2", "--duration", "1.5", "--warmup", "0.5", "--json"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["transport"] == "grpc" and out["grpc"] == {
        "target": serve_endpoints.grpc, "application": "cli", "channels": 2, "encoding": "packed"}
    assert out["requests"] > 0 and out["errors"] == {} and out["faces"] == 2 * out["requests"]
    assert out["latency_ms_p99"] >= out["latency_ms_p50"] > 0
    assert out["inprocess_fps"] > 0 and out["ratio_to_inprocess"] > 0
    cpu = out["shell_cpu"]
    assert cpu["cpu_ms_per_face"] > 0 and "driver" not in cpu["cpu_s_by_role"], cpu
    assert cpu["cpu_s_by_role"].get("replica", 0) > 0 and cpu["cpu_s_by_role"].get("proxy", 0) > 0, cpu


class _StopOnRetry(logging.Handler):
    """Records the client's retry lines and sets ``stop`` at the first: the flood ends only once
    the patient client has met a 503, so the test does not depend on the host's speed."""

    def __init__(self, stop: threading.Event) -> None:
        super().__init__(logging.INFO)
        self.stop, self.retries = stop, []

    def emit(self, record: logging.LogRecord) -> None:
        if "retry" in record.getMessage():
            self.retries.append(record.getMessage())
            self.stop.set()


def test_retries_on_503_wait_retry_after_and_succeed_once_the_queue_drains(serve_endpoints, faces):
    """Fill the replica's queue with heavy requests: a client without retries gets the 503, a
    client with retries waits at least Retry-After between tries and gets its answer."""
    # a queue wait shorter than one batch: while any flood request runs, every other is refused
    deploy("busy", {"max_queue_wait_s": 0.02, "retry_after_s": 1},
           user_config={"max_batch_size": 32, "batch_wait_timeout_s": 0.0})
    url = serve_endpoints.http + "/busy"
    heavy = encode_npy(np.repeat(faces, 13, axis=0)[:256])
    stop = threading.Event()

    def flood(_):
        while not stop.is_set():
            try:
                requests.post(url + "/v1/embed", data=heavy, headers={"content-type": NPY_MEDIA_TYPE},
                              timeout=120)
            except requests.RequestException:  # refused before the body was read: the connection
                continue  # closes mid-upload; a flood thread that died would let the queue drain

    client_log = logging.getLogger("serve_app.client")
    watcher = _StopOnRetry(stop)
    with ThreadPoolExecutor(8) as pool:
        for i in range(8):
            pool.submit(flood, i)
        time.sleep(1.0)
        with EmbeddingClient(url, retry=RetryPolicy(retries=0), max_faces_per_request=256) as impatient:
            with pytest.raises(ServiceError) as info:
                for _ in range(20):
                    impatient.embed(faces[:16])
            assert info.value.status == 503 and info.value.retry_after_s == 1.0
        level = client_log.level
        client_log.setLevel(logging.INFO)
        client_log.addHandler(watcher)
        try:
            patience = RetryPolicy(retries=30, backoff_s=0.05)
            with EmbeddingClient(url, retry=patience, max_faces_per_request=256) as patient:
                for _ in range(40):  # until one call meets the full queue (then the flood stops)
                    started = time.monotonic()
                    result = patient.embed(faces[:16])
                    elapsed = time.monotonic() - started
                    if watcher.retries:
                        break
        finally:
            stop.set()
            client_log.removeHandler(watcher)
            client_log.setLevel(level)
    assert result.embeddings.shape == (16, 512)
    assert watcher.retries, "the client never saw a 503 in 40 calls: the queue was not full"
    assert all(float(m.rsplit(" in ", 1)[1].split()[0]) >= 1.0 for m in watcher.retries)  # Retry-After
    assert elapsed >= len(watcher.retries) * 1.0
