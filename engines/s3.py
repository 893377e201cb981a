"""S3 access shared by model resolution and the engine cache.

boto3 with a configurable ``endpoint_url``: AWS S3 in production, MinIO or any
S3-compatible server elsewhere, and moto's server on 127.0.0.1 in tests. No
client patching anywhere: what the tests exercise is the HTTP protocol.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ChecksumMismatch, EngineError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class S3Uri:
    bucket: str
    key: str

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.key}"


def parse_s3_uri(uri: str) -> S3Uri:
    """``s3://bucket/key`` -> ``S3Uri``; a clear error for anything else."""
    if not uri.startswith("s3://"):
        raise ValueError(f"not an S3 URI (expected s3://bucket/key): {uri!r}")
    bucket, _, key = uri[len("s3://") :].partition("/")
    if not bucket or not key:
        raise ValueError(f"S3 URI needs both a bucket and a key: {uri!r}")
    return S3Uri(bucket, key)


def make_client(
    endpoint_url: str | None = None,
    region: str | None = None,
    max_attempts: int = 5,
    connect_timeout: float = 5,
) -> Any:
    """A boto3 S3 client; ``endpoint_url`` / ``region`` default to AWS's own resolution.

    ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL`` (boto3's own variables) also
    work when ``endpoint_url`` is not set. ``max_attempts=1`` makes a probe
    that answers "unreachable" at once instead of after seconds of back-off.
    """
    import boto3
    from botocore.config import Config as BotoConfig

    return boto3.client(
        "s3",
        endpoint_url=endpoint_url or None,
        region_name=region or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1",
        config=BotoConfig(
            retries={"max_attempts": max_attempts, "mode": "standard"},
            connect_timeout=connect_timeout,
            read_timeout=60,
        ),
    )


def sha256_file(path: str | Path, chunk: int = 8 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def download_verified(
    client: Any, uri: S3Uri, dest: Path, expected_sha256: str | None = None
) -> str:
    """Download ``uri`` to ``dest`` atomically; verify sha256 before the rename.

    Returns the sha256 of the downloaded bytes. A mismatch deletes the partial
    file and raises: nothing unverified is ever left where a loader could find it.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        try:
            client.download_file(uri.bucket, uri.key, str(tmp))
        except Exception as exc:
            raise EngineError(f"cannot download {uri}: {exc}") from exc
        actual = sha256_file(tmp)
        if expected_sha256 and actual != expected_sha256:
            raise ChecksumMismatch(
                f"checksum mismatch for {uri}: expected sha256 {expected_sha256}, "
                f"downloaded {actual}; refusing to use it"
            )
        os.replace(tmp, dest)
        return actual
    finally:
        tmp.unlink(missing_ok=True)
