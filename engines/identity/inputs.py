"""What ``arcface gallery enroll`` reads: a directory ``<identity>/<image>`` or a Parquet manifest.

Both give aligned 112x112 BGR crops: an image is an aligned crop, or any image with five
landmarks (a ``<image>.json`` sidecar in a directory, a ``kps`` column of 10 floats in a
manifest), aligned with the ArcFace template. The manifest's columns: ``identity``
(string), and per row ``image`` (encoded bytes) or ``path`` (relative to the manifest's
directory), optional ``kps``. Every row must decode: an enrollment that silently skipped a
photo would stand for a different person than the one asked for.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..base.align import check_landmarks, norm_crop
from ..base.image import DEFAULT_MAX_PIXELS, ImageRejected, decode_image
from ..base.preprocess import FACE_SIZE
from ..errors import ConfigError
from ..evaluate.labelled import load_crop, load_identity_dir
from .gallery import check_identity_name


@dataclass(frozen=True)
class EnrollFaces:
    identities: tuple[str, ...]
    sources: tuple[str, ...]  # a stable name per photo: re-enrolling it replaces, never duplicates
    crops: np.ndarray


def _checked(identities: list[str], sources: list[str], crops: list[np.ndarray], where: str) -> EnrollFaces:
    for name in set(identities):
        try:
            check_identity_name(name)
        except ValueError as exc:
            raise ConfigError(f"{where}: {exc}") from None
    return EnrollFaces(tuple(identities), tuple(sources), np.stack(crops))


def read_enroll_dir(root: Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> EnrollFaces:
    """``root/<identity>/<image>``: sources are the paths relative to ``root``."""
    faces = load_identity_dir(Path(root), max_pixels, min_identities=1)
    sources = [str(Path(p).relative_to(root)) for p in faces.paths]
    return _checked(list(faces.identities), sources, list(faces.crops), str(root))


def read_enroll_manifest(path: Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> EnrollFaces:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}: not a readable Parquet manifest ({exc})") from None
    names = set(table.column_names)
    if "identity" not in names or not names & {"image", "path"}:
        raise ConfigError(f"{path}: a gallery manifest needs an 'identity' column and 'image' (bytes) or "
                          f"'path'; it has {sorted(names)}")
    if not table.num_rows:
        raise ConfigError(f"{path}: the manifest has no rows")
    rows = table.to_pylist()
    identities, sources, crops = [], [], []
    for i, row in enumerate(rows):
        where = f"{path} row {i}"
        identity, data, rel = row.get("identity"), row.get("image"), row.get("path")
        if not isinstance(identity, str):
            raise ConfigError(f"{where}: identity must be a string, got {identity!r}")
        if data is None and rel is None:
            raise ConfigError(f"{where}: neither image nor path")
        kps = row.get("kps")
        if data is None and kps is None:
            crops.append(load_crop(Path(path).parent / rel, max_pixels))
        else:
            try:
                image = decode_image(data if data is not None else (Path(path).parent / rel).read_bytes(),
                                     max_pixels)
            except (OSError, ImageRejected) as exc:
                raise ConfigError(f"{where}: {exc}") from None
            crops.append(_align(image, kps, where))
        identities.append(identity)
        sources.append(rel if rel is not None else f"row{i}")
    return _checked(identities, sources, crops, str(path))


def _align(image: np.ndarray, kps, where: str) -> np.ndarray:
    if kps is None:
        if image.shape[:2] != (FACE_SIZE, FACE_SIZE):
            raise ConfigError(f"{where}: {image.shape[1]}x{image.shape[0]} is not an aligned "
                              f"{FACE_SIZE}x{FACE_SIZE} crop and the row has no kps")
        return image
    try:
        landmarks = np.asarray(kps, np.float64).reshape(5, 2)
        check_landmarks(landmarks, image.shape)
    except ValueError as exc:
        raise ConfigError(f"{where}: kps: {exc}") from None
    return norm_crop(image, landmarks.astype(np.float32))


def read_enroll_input(path: str) -> EnrollFaces:
    source = Path(path)
    if source.is_dir():
        return read_enroll_dir(source)
    if source.suffix == ".parquet" and source.is_file():
        return read_enroll_manifest(source)
    raise ConfigError(f"{path}: expected a directory of <identity>/<image> files or a .parquet manifest")
