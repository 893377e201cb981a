"""CPU stage: bytes -> aligned 112x112 BGR crops, one (reason, error) per row that failed.

A row that cannot be read, decoded or aligned never stops the job, whatever raised:
it leaves this stage with ``reason`` and ``error`` set (and a black crop that the
embed stage skips) and ends up in the errors table. The rules are the service's:
``engines.decode_image`` (formats by magic bytes, the declared size checked before
decoding) and ``engines.check_landmarks``, so the same bytes and landmarks are refused
online and offline. Reads are bounded in bytes and in time (``safe_read``).

``reason`` is one of ``ROW_REASONS`` (README "Offline job" lists what each means).
The job's stage is ``decode_table`` (Arrow in, Arrow out): the columns it consumes
(``image``, ``path``, ``kps``) are read, every other column passes through untouched,
Arrow type included (``columns.py``), and the crops leave as one tensor column built
without a copy.
"""

from __future__ import annotations

import logging
import posixpath
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs

from engines import FACE_SIZE, ImageRejected, check_landmarks, decode_image, locate, norm_crop

from .safe_read import InputRefused, read_limited
from .settings import EpisodeJobSettings

logger = logging.getLogger(__name__)

PASS_THROUGH = ("uid", "episode_id", "track_id", "frame")
ROW_REASONS = (
    "unreadable", "not_a_file", "file_too_large", "read_timeout",  # reading (safe_read)
    "not_an_image", "unsupported_format", "image_too_large",  # decoding (engines.decode_image)
    "bad_landmarks", "not_aligned", "no_image", "decode_error",  # this module
)


@dataclass(frozen=True)
class DecodeLimits:
    """Per-row limits: declared pixels decoded, bytes read, seconds per read (``episodes.*``)."""

    max_image_pixels: int
    max_file_bytes: int
    read_timeout_s: float

    @classmethod
    def of(cls, settings: EpisodeJobSettings) -> DecodeLimits:
        return cls(settings.max_image_pixels, int(settings.max_file_mb * (1 << 20)), settings.read_timeout_s)


def _column(batch: dict[str, np.ndarray], name: str, n: int) -> np.ndarray:
    value = batch.get(name)
    return value if value is not None else np.full(n, None, dtype=object)


class _Reader:
    """Where a row's ``path`` is read from: ``s3://`` paths through the configured endpoint (one
    filesystem per batch, not one per row), relative paths against the manifest's directory."""

    def __init__(self, fs: pafs.FileSystem, base: str | None, s3: dict[str, str | None] | None,
                 limits: DecodeLimits) -> None:
        self.fs, self.base, self.s3, self.limits = fs, base, s3 or {}, limits
        self._s3_fs: pafs.FileSystem | None = None

    def read(self, path: str) -> bytes:
        fs = self.fs
        if path.startswith("s3://"):
            loc = locate(path, **self.s3)  # the configured endpoint: MinIO / moto manifests too
            self._s3_fs = self._s3_fs or loc.fs
            fs, path = self._s3_fs, loc.path
        elif self.base is not None and not posixpath.isabs(path):
            path = posixpath.join(self.base, path)
        return read_limited(fs, path, self.limits.max_file_bytes, self.limits.read_timeout_s)


def _landmarks(kps: Any) -> np.ndarray:
    try:
        values = np.asarray(kps.tolist() if isinstance(kps, np.ndarray) else kps, dtype=np.float64)
    except (TypeError, ValueError):
        raise InputRefused("bad_landmarks", "kps must be 10 numbers (5 x, y landmarks)") from None
    if values.size != 10:
        raise InputRefused("bad_landmarks", f"kps must be 5 (x, y) points, got {values.size} values")
    return values.reshape(5, 2)


def decode_one(data: bytes, kps: Any, max_pixels: int) -> np.ndarray:
    """Bytes (+ optional landmarks) -> crop; raises ``InputRefused`` / ``ImageRejected``."""
    image = decode_image(data, max_pixels)
    if kps is not None and len(kps):
        landmarks = _landmarks(kps)
        try:
            check_landmarks(landmarks, image.shape)
        except ValueError as exc:
            raise InputRefused("bad_landmarks", str(exc)) from None
        return norm_crop(image, landmarks.astype(np.float32))
    if image.shape[:2] != (FACE_SIZE, FACE_SIZE):
        h, w = image.shape[:2]
        raise InputRefused("not_aligned",
                          f"image is {w}x{h}, not an aligned {FACE_SIZE}x{FACE_SIZE} crop, and has no kps")
    return image


def _row_bytes(image: Any, path: Any, reader: _Reader) -> bytes:
    if image is not None:
        data = bytes(image)
        if len(data) > reader.limits.max_file_bytes:
            raise InputRefused("file_too_large", f"inline image is {len(data):,} bytes; at most "
                                                f"{reader.limits.max_file_bytes:,} are decoded")
        return data
    if path is not None:
        return reader.read(str(path))
    raise InputRefused("no_image", "row has neither image bytes nor a path")


def _decode_rows(uids: np.ndarray, images: np.ndarray, paths: np.ndarray, kps: np.ndarray,
                 reader: _Reader) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(crops, reasons, errors, sources) of rows given as object arrays (None where absent)."""
    n = len(uids)
    crops = np.zeros((n, FACE_SIZE, FACE_SIZE, 3), np.uint8)
    reasons = np.full(n, "", dtype=object)
    errors = np.full(n, "", dtype=object)
    sources = np.array([str(p) if p is not None else "<inline>" for p in paths], dtype=object)
    for i in range(n):
        try:
            data = _row_bytes(images[i], paths[i], reader)
            crops[i] = decode_one(data, kps[i], reader.limits.max_image_pixels)
        except (InputRefused, ImageRejected) as exc:
            reasons[i], errors[i] = exc.reason, str(exc)
        except Exception as exc:  # a row never fails the job, whatever library raised
            kind = type(exc).__name__
            logger.warning("row %s (%s): unexpected %s: %s", uids[i], sources[i], kind, exc)
            logger.debug("row %s", uids[i], exc_info=True)
            reasons[i], errors[i] = "decode_error", f"{kind}: {str(exc)[:300]}"
    return crops, reasons, errors, sources


def _reader(filesystem: pafs.FileSystem | None, base: str | None, s3: dict[str, str | None] | None,
            limits: DecodeLimits | None) -> _Reader:
    limits = limits or DecodeLimits.of(EpisodeJobSettings())
    return _Reader(filesystem or pafs.LocalFileSystem(), base, s3, limits)


def decode_batch(
    batch: dict[str, np.ndarray],
    filesystem: pafs.FileSystem | None = None,
    base: str | None = None,
    s3: dict[str, str | None] | None = None,
    limits: DecodeLimits | None = None,
) -> dict[str, np.ndarray]:
    """The decode/align stage on a dict of numpy columns (the in-process reference's form).

    ``s3`` (``endpoint_url``, ``region``) is how ``s3://`` paths inside a manifest
    are reached: the same store settings as the job's input and output. ``limits``
    default to those of ``config/episodes.yaml``'s defaults.
    """
    n = len(batch["uid"])
    reader = _reader(filesystem, base, s3, limits)
    crops, reasons, errors, sources = _decode_rows(
        batch["uid"], _column(batch, "image", n), _column(batch, "path", n), _column(batch, "kps", n), reader)
    out = {name: np.asarray(batch[name], dtype=object) for name in PASS_THROUGH}
    out.update(source=sources, crop=crops, reason=reasons, error=errors)
    return out


def _objects(table: pa.Table, name: str) -> np.ndarray:
    if name not in table.column_names:
        return np.full(table.num_rows, None, dtype=object)
    return table[name].to_numpy(zero_copy_only=False)


def decode_table(
    table: pa.Table,
    filesystem: pafs.FileSystem | None = None,
    base: str | None = None,
    s3: dict[str, str | None] | None = None,
    limits: DecodeLimits | None = None,
) -> pa.Table:
    """``map_batches`` function (pyarrow format) of the decode/align stage: ``image``, ``path``
    and ``kps`` are consumed; ``source``, ``crop`` (a tensor column), ``reason`` and ``error``
    are added; every other column (ids, ``uid``, pass-through) is the input's, untouched."""
    from ray.data.extensions import ArrowTensorArray

    reader = _reader(filesystem, base, s3, limits)
    columns = (_objects(table, c) for c in ("uid", "image", "path", "kps"))
    crops, reasons, errors, sources = _decode_rows(*columns, reader)
    out = table.drop_columns([c for c in ("image", "path", "kps") if c in table.column_names])
    added = {"source": pa.array(sources, pa.string()), "crop": ArrowTensorArray.from_numpy(crops),
             "reason": pa.array(reasons, pa.string()), "error": pa.array(errors, pa.string())}
    for name, values in added.items():
        out = out.append_column(name, values)
    return out
