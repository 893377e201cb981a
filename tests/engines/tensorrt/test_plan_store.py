"""The S3 engine store and its build lock, against a real S3 API server (moto) over HTTP."""

from __future__ import annotations

import hashlib
import time

import pytest

from engines.errors import ChecksumMismatch
from engines.s3 import make_client
from engines.tensorrt.plan_store import S3PlanStore


@pytest.fixture
def store(s3_endpoint, bucket) -> S3PlanStore:
    return S3PlanStore(make_client(s3_endpoint), bucket, "arcface/engines")


KEY = "synthetic-mobilefacenet-0123abcd-fp16-sm89-d0a1b2c-trt10.16.0.0-cu12-b1_32_128.plan"


def _publish(store: S3PlanStore, tmp_path, data: bytes) -> dict:
    plan = tmp_path / "published.plan"
    plan.write_bytes(data)
    sidecar = {"sha256": hashlib.sha256(data).hexdigest(), "key": KEY}
    store.upload(KEY, plan, sidecar)
    return sidecar


def test_server_honours_conditional_writes(s3_endpoint, bucket):
    """The lock rests on these S3 semantics; check the server really has them."""
    from botocore.exceptions import ClientError

    client = make_client(s3_endpoint)
    first = client.put_object(Bucket=bucket, Key="k.lock", Body=b"a", IfNoneMatch="*")
    with pytest.raises(ClientError) as err:
        client.put_object(Bucket=bucket, Key="k.lock", Body=b"b", IfNoneMatch="*")
    assert err.value.response["ResponseMetadata"]["HTTPStatusCode"] == 412
    with pytest.raises(ClientError) as err:
        client.put_object(Bucket=bucket, Key="k.lock", Body=b"c", IfMatch='"0000"')
    assert err.value.response["ResponseMetadata"]["HTTPStatusCode"] == 412
    client.put_object(Bucket=bucket, Key="k.lock", Body=b"d", IfMatch=first["ETag"])
    assert client.get_object(Bucket=bucket, Key="k.lock")["Body"].read() == b"d"


def test_upload_download_round_trip(store, tmp_path):
    data = bytes(range(256)) * 1000
    sidecar = _publish(store, tmp_path, data)
    assert store.sidecar(KEY) == sidecar
    dest = tmp_path / "local" / KEY
    store.download(KEY, dest, sidecar["sha256"])
    assert dest.read_bytes() == data
    listed = store.list()
    assert [e["key"] for e in listed] == [KEY]
    assert listed[0]["complete"] and listed[0]["size"] == len(data) and not listed[0]["building"]


def test_corrupted_download_is_rejected_and_leaves_nothing(store, s3_endpoint, bucket, tmp_path):
    sidecar = _publish(store, tmp_path, b"the real plan" * 100)
    make_client(s3_endpoint).put_object(Bucket=bucket, Key=store.uri(KEY).key, Body=b"bit rot" * 100)
    dest = tmp_path / "local" / KEY
    with pytest.raises(ChecksumMismatch, match="checksum mismatch"):
        store.download(KEY, dest, sidecar["sha256"])
    assert list(dest.parent.iterdir()) == []


def test_missing_engine_has_no_sidecar(store):
    assert store.sidecar(KEY) is None
    assert store.list() == []
    assert store.lock_state(KEY, 60) is None


def test_lock_is_exclusive_and_released_only_by_its_owner(store):
    mine = store.try_lock(KEY, ttl_s=60)
    assert mine is not None
    assert store.try_lock(KEY, ttl_s=60) is None
    state = store.lock_state(KEY, 60)
    assert state.etag == mine.etag and not state.expired and state.ttl_s == 60
    assert store.list() == []  # a lock alone publishes nothing
    store.release(mine)
    assert store.lock_state(KEY, 60) is None
    assert store.try_lock(KEY, ttl_s=60) is not None


def test_expired_lock_is_taken_over_by_exactly_one_host(store):
    dead = store.try_lock(KEY, ttl_s=1)
    time.sleep(2.2)  # Last-Modified and Date have one-second resolution
    stale = store.lock_state(KEY, 1)
    assert stale.expired and stale.age_s >= 1
    winner = store.take_over(KEY, stale, ttl_s=60)
    assert winner is not None
    assert store.take_over(KEY, stale, ttl_s=60) is None  # the stale ETag is gone
    store.release(dead)  # the dead builder waking up must not free the new owner's lock
    assert store.lock_state(KEY, 60).etag == winner.etag
    assert not store.refresh(dead)


def test_heartbeat_keeps_a_long_build_locked(store):
    handle = store.try_lock(KEY, ttl_s=1.5)
    first = handle.etag
    with store.heartbeat(handle):
        time.sleep(3.2)
        state = store.lock_state(KEY, 1.5)
    assert not state.expired and handle.etag != first
    assert state.etag == handle.etag
