"""CPU stage: bytes -> aligned 112x112 BGR crops, one error string per row that failed.

A row that cannot be read, decoded or aligned never stops the job: it leaves
this stage with ``error`` set (and a black crop that the embed stage skips) and
ends up in the errors table with its reason.
"""

from __future__ import annotations

import posixpath
from typing import Any

import cv2
import numpy as np
import pyarrow.fs as pafs

from engines import FACE_SIZE, norm_crop

from .storage import locate, read_bytes

PASS_THROUGH = ("uid", "episode_id", "track_id", "frame")


def _column(batch: dict[str, np.ndarray], name: str, n: int) -> np.ndarray:
    value = batch.get(name)
    return value if value is not None else np.full(n, None, dtype=object)


def _resolve(
    path: str, fs: pafs.FileSystem, base: str | None, s3: dict[str, str | None] | None = None
) -> tuple[pafs.FileSystem, str]:
    if path.startswith("s3://"):
        loc = locate(path, **(s3 or {}))  # the configured endpoint: MinIO / moto manifests too
        return loc.fs, loc.path
    if base is not None and not posixpath.isabs(path):
        return fs, posixpath.join(base, path)
    return fs, path


def decode_one(data: bytes | None, kps: Any, where: str) -> np.ndarray:
    """Bytes (+ optional landmarks) -> crop; raises ``ValueError`` with the reason."""
    if not data:
        raise ValueError("empty file")
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if image is None:
        raise ValueError(f"not a decodable image ({len(data)} bytes)")
    if kps is not None and len(kps):
        landmarks = np.asarray(kps, dtype=np.float32).reshape(-1)
        if landmarks.size != 10 or not np.isfinite(landmarks).all():
            raise ValueError(f"kps must be 5 finite (x, y) points, got {landmarks.size} values")
        return norm_crop(image, landmarks.reshape(5, 2))
    if image.shape[:2] != (FACE_SIZE, FACE_SIZE):
        h, w = image.shape[:2]
        raise ValueError(f"image is {w}x{h}, not an aligned {FACE_SIZE}x{FACE_SIZE} crop, and has no kps")
    return image


def decode_batch(
    batch: dict[str, np.ndarray],
    filesystem: pafs.FileSystem | None = None,
    base: str | None = None,
    s3: dict[str, str | None] | None = None,
) -> dict[str, np.ndarray]:
    """``map_batches`` function (numpy format) of the decode/align stage.

    ``s3`` (``endpoint_url``, ``region``) is how ``s3://`` paths inside a manifest
    are reached: the same store settings as the job's input and output.
    """
    n = len(batch["uid"])
    fs = filesystem or pafs.LocalFileSystem()
    paths, images, kps = _column(batch, "path", n), _column(batch, "image", n), _column(batch, "kps", n)
    crops = np.zeros((n, FACE_SIZE, FACE_SIZE, 3), np.uint8)
    errors = np.full(n, "", dtype=object)
    sources = np.empty(n, dtype=object)
    for i in range(n):
        path = paths[i]
        sources[i] = str(path) if path is not None else "<inline>"
        try:
            if images[i] is not None:
                data = bytes(images[i])
            elif path is not None:
                try:
                    data = read_bytes(*_resolve(str(path), fs, base, s3))
                except OSError as exc:  # pyarrow's IO errors are OSErrors too
                    raise ValueError(f"cannot read {path}: {exc}") from None
            else:
                raise ValueError("row has neither image bytes nor a path")
            crops[i] = decode_one(data, kps[i], sources[i])
        except ValueError as exc:
            errors[i] = str(exc)
    out = {name: np.asarray(batch[name], dtype=object) for name in PASS_THROUGH}
    out.update(source=sources, crop=crops, error=errors)
    return out
