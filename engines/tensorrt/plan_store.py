"""TensorRT plans shared through S3: plan + JSON sidecar per key, and a build lock per key.

Layout under ``s3://{bucket}/{prefix}/``: ``KEY`` (the plan), ``KEY.json``
(its sidecar; written last, so its presence means "complete"), ``KEY.lock``
(a build in progress).

The lock is an object created with a conditional put (``If-None-Match: *``):
S3 lets exactly one writer create it; everyone else gets 412. Its age is
measured on the server's clock (``Last-Modified`` against the response's
``Date`` header), so skewed host clocks cannot steal or keep a lock. The
holder refreshes it (conditional put, ``If-Match`` its own ETag) every
``ttl/3``; a lock older than its ttl belongs to a dead builder and is taken
over with ``If-Match`` the stale ETag, which again only one host can win.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any

from ..errors import ChecksumMismatch, EngineError
from ..s3 import S3Uri, download_verified, make_client

logger = logging.getLogger(__name__)

SIDECAR_SUFFIX = ".json"
LOCK_SUFFIX = ".lock"
_NOT_FOUND = ("NoSuchKey", "404", "NotFound")  # GET says NoSuchKey; HEAD has no body, only 404


class StoreUnreachable(EngineError):
    """S3 cannot be used right now (connection, credentials, missing bucket): build locally."""


@dataclass
class LockHandle:
    key: str
    etag: str
    owner: str
    ttl_s: float


@dataclass(frozen=True)
class LockState:
    etag: str
    owner: str
    host: str
    age_s: float
    ttl_s: float

    @property
    def expired(self) -> bool:
        return self.age_s > self.ttl_s


def _botocore_errors() -> tuple[type[BaseException], type[BaseException]]:
    from botocore.exceptions import BotoCoreError, ClientError

    return BotoCoreError, ClientError


def _code(exc: BaseException) -> str:
    response = getattr(exc, "response", None) or {}
    err = response.get("Error", {})
    return str(err.get("Code") or response.get("ResponseMetadata", {}).get("HTTPStatusCode", ""))


def _server_now(response: dict) -> datetime:
    date = response.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get("date")
    try:
        return parsedate_to_datetime(date) if date else datetime.now(timezone.utc)
    except (TypeError, ValueError):
        return datetime.now(timezone.utc)


class S3PlanStore:
    """Plans, sidecars and build locks in one bucket/prefix, through a real boto3 client."""

    def __init__(self, client: Any, bucket: str, prefix: str = "", probe_client: Any = None) -> None:
        self.client = client
        self.probe_client = probe_client or client
        self.bucket = bucket
        self.prefix = prefix.strip("/")

    @classmethod
    def from_config(cls, storage: Any) -> S3PlanStore | None:
        """The store ``storage`` describes, or ``None`` for ``type: local``."""
        if storage.type != "s3":
            return None
        if not storage.bucket:
            raise EngineError("tensorrt.storage.type is 's3' but tensorrt.storage.bucket is not set")
        client = make_client(storage.endpoint_url, storage.region)
        probe = make_client(storage.endpoint_url, storage.region, max_attempts=1, connect_timeout=3)
        return cls(client, storage.bucket, storage.prefix, probe_client=probe)

    def uri(self, name: str) -> S3Uri:
        return S3Uri(self.bucket, f"{self.prefix}/{name}" if self.prefix else name)

    @contextlib.contextmanager
    def _calls(self, what: str):
        """Connection-level failures become ``StoreUnreachable``; S3 answers stay ClientErrors."""
        boto_error, _ = _botocore_errors()
        try:
            yield
        except boto_error as exc:
            raise StoreUnreachable(f"S3 {what} on s3://{self.bucket}/{self.prefix}: {exc}") from exc

    def _found_or_none(self, what: str, call: Any, uri: S3Uri) -> Any:
        """``call(Bucket=, Key=)`` on ``uri``; ``None`` when S3 says the object does not exist."""
        _, client_error = _botocore_errors()
        with self._calls(what):
            try:
                return call(Bucket=uri.bucket, Key=uri.key)
            except client_error as exc:
                if _code(exc) in _NOT_FOUND:
                    return None
                raise

    def _read_or_none(self, what: str, uri: S3Uri) -> tuple[dict, bytes] | None:
        """``(response, body)`` of a GET on ``uri``; ``None`` when the object does not exist."""
        resp = self._found_or_none(what, self.client.get_object, uri)
        if resp is None:
            return None
        with self._calls(what):
            return resp, resp["Body"].read()

    def check(self) -> None:
        """One fast round trip (no retries): is the bucket there and ours to use?"""
        _, client_error = _botocore_errors()
        with self._calls("head_bucket"):
            try:
                self.probe_client.head_bucket(Bucket=self.bucket)
            except client_error as exc:
                raise StoreUnreachable(
                    f"S3 bucket {self.bucket!r} is not usable ({_code(exc)}): {exc}"
                ) from exc

    # -- plans and sidecars -----------------------------------------------------------
    def sidecar(self, key: str) -> dict | None:
        """The published sidecar of ``key`` (``None``: not published, or unreadable)."""
        uri = self.uri(key + SIDECAR_SUFFIX)
        found = self._read_or_none("get sidecar", uri)
        if found is None:
            return None
        _, body = found
        try:
            data = json.loads(body)
        except ValueError:
            logger.warning("%s is not JSON; treating the engine as absent", uri)
            return None
        return data if isinstance(data, dict) and data.get("sha256") else None

    def plan_etag(self, key: str) -> str | None:
        """The plan object's ETag (changes with every upload); ``None`` if absent."""
        resp = self._found_or_none("head plan", self.client.head_object, self.uri(key))
        return None if resp is None else resp["ETag"]

    def download(self, key: str, dest: Path, expected_sha256: str) -> None:
        """Atomic, verified download; ``ChecksumMismatch`` leaves nothing behind."""
        boto_error, _ = _botocore_errors()
        try:
            download_verified(self.client, self.uri(key), dest, expected_sha256)
        except ChecksumMismatch:
            raise
        except EngineError as exc:
            if isinstance(exc.__cause__, boto_error):
                raise StoreUnreachable(str(exc)) from exc
            raise

    def upload(self, key: str, plan_path: Path, sidecar: dict) -> None:
        """Plan first, sidecar last: a reader that sees the sidecar finds the plan."""
        plan, side = self.uri(key), self.uri(key + SIDECAR_SUFFIX)
        with self._calls("upload"):
            self.client.upload_file(str(plan_path), plan.bucket, plan.key)
            self.client.put_object(Bucket=side.bucket, Key=side.key, ContentType="application/json",
                                   Body=json.dumps(sidecar, indent=2, sort_keys=True).encode())
        logger.info("uploaded %s (%d bytes) to %s", key, plan_path.stat().st_size, plan)

    def list(self) -> list[dict[str, Any]]:
        """Every plan under the prefix: key, size, last modified, whether its sidecar is there."""
        base = f"{self.prefix}/" if self.prefix else ""
        objects: dict[str, dict] = {}
        with self._calls("list"):
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket,
                                                                              Prefix=base):
                for obj in page.get("Contents", []):
                    objects[obj["Key"][len(base):]] = obj
        out = []
        for name, obj in sorted(objects.items()):
            if name.endswith(".plan"):
                out.append({"key": name, "size": obj["Size"],
                            "modified": obj["LastModified"].isoformat(),
                            "complete": name + SIDECAR_SUFFIX in objects,
                            "building": name + LOCK_SUFFIX in objects,
                            "uri": str(self.uri(name))})
        return out

    # -- the build lock ---------------------------------------------------------------
    def _lock_body(self, key: str, owner: str, ttl_s: float) -> bytes:
        return json.dumps({"key": key, "owner": owner, "host": socket.gethostname(), "pid": os.getpid(),
                           "ttl_s": ttl_s, "written_at": time.time()}).encode()

    def _conditional_put(self, key: str, owner: str, ttl_s: float, **condition: str) -> str | None:
        """Write the lock object under ``condition``; its new ETag, or ``None`` if we lost."""
        _, client_error = _botocore_errors()
        uri = self.uri(key + LOCK_SUFFIX)
        with self._calls("lock"):
            try:
                resp = self.client.put_object(Bucket=uri.bucket, Key=uri.key,
                                              Body=self._lock_body(key, owner, ttl_s), **condition)
            except client_error as exc:
                # 412: the condition failed; 409: a concurrent conditional write won the race
                if _code(exc) in ("PreconditionFailed", "412", "ConditionalRequestConflict", "409"):
                    return None
                raise
        return resp["ETag"]

    def try_lock(self, key: str, ttl_s: float) -> LockHandle | None:
        """Create the lock iff no one holds it (``If-None-Match: *``)."""
        owner = uuid.uuid4().hex
        etag = self._conditional_put(key, owner, ttl_s, IfNoneMatch="*")
        return LockHandle(key, etag, owner, ttl_s) if etag else None

    def lock_state(self, key: str, default_ttl_s: float) -> LockState | None:
        """Who holds the lock and for how long, on the server's clock (``None``: nobody)."""
        found = self._read_or_none("read lock", self.uri(key + LOCK_SUFFIX))
        if found is None:
            return None
        resp, body = found
        try:
            info = json.loads(body)
        except ValueError:
            info = {}
        age = (_server_now(resp) - resp["LastModified"]).total_seconds()
        return LockState(etag=resp["ETag"], owner=str(info.get("owner", "?")),
                         host=str(info.get("host", "?")), age_s=max(age, 0.0),
                         ttl_s=float(info.get("ttl_s") or default_ttl_s))

    def take_over(self, key: str, stale: LockState, ttl_s: float) -> LockHandle | None:
        """Replace an expired lock iff it is still the same object (``If-Match`` its ETag)."""
        owner = uuid.uuid4().hex
        etag = self._conditional_put(key, owner, ttl_s, IfMatch=stale.etag)
        return LockHandle(key, etag, owner, ttl_s) if etag else None

    def refresh(self, handle: LockHandle) -> bool:
        """Heartbeat: rewrite our own lock (``If-Match`` our ETag); ``False`` if it was taken."""
        etag = self._conditional_put(handle.key, handle.owner, handle.ttl_s, IfMatch=handle.etag)
        if etag is None:
            return False
        handle.etag = etag
        return True

    def release(self, handle: LockHandle) -> None:
        """Delete our lock, and only ours (``If-Match``); failures are logged, never raised."""
        _, client_error = _botocore_errors()
        uri = self.uri(handle.key + LOCK_SUFFIX)
        try:
            with self._calls("release lock"):
                self.client.delete_object(Bucket=uri.bucket, Key=uri.key, IfMatch=handle.etag)
        except client_error as exc:
            if _code(exc) not in ("PreconditionFailed", "412", "NoSuchKey", "404"):
                logger.warning("could not release build lock %s: %s (it expires after %.0f s)",
                               uri, exc, handle.ttl_s)
        except StoreUnreachable as exc:
            logger.warning("could not release build lock %s: %s (it expires after %.0f s)",
                           uri, exc, handle.ttl_s)

    @contextlib.contextmanager
    def heartbeat(self, handle: LockHandle):
        """Keep ``handle`` fresh while the body runs (a build can outlast the ttl)."""
        stop = threading.Event()

        def beat() -> None:
            while not stop.wait(handle.ttl_s / 3):
                try:
                    if not self.refresh(handle):
                        logger.warning("build lock for %s was taken over by another host", handle.key)
                        return
                except EngineError as exc:
                    logger.warning("build lock heartbeat for %s failed: %s", handle.key, exc)

        thread = threading.Thread(target=beat, name=f"lock-heartbeat-{handle.key}", daemon=True)
        thread.start()
        try:
            yield handle
        finally:
            stop.set()
            thread.join()
