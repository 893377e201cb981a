"""Labelled faces from files: a directory ``identity/<image>`` or a pairs file (``a, b, same``).

Images are aligned 112x112 crops, or any image with a landmarks sidecar
``<image>.json`` (``{"landmarks": [[x, y] x 5]}`` or the bare list, pixel
coordinates in that image), aligned here with the ArcFace template. Every file
goes through the shared safe decode (``base.image.decode_image``) and the
shared landmark rules (``base.align.check_landmarks``); a file that fails is an
error naming it, because a verification figure over silently skipped faces is
not the figure it claims to be.
"""

from __future__ import annotations

import csv
import itertools
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..base.align import check_landmarks, norm_crop
from ..base.image import DEFAULT_MAX_PIXELS, ImageRejected, decode_image
from ..base.preprocess import FACE_SIZE
from ..errors import ConfigError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")
_TRUE = {"1", "true", "same", "yes", "genuine"}
_FALSE = {"0", "false", "diff", "different", "no", "impostor"}


class LabelledInputError(ConfigError):
    """A labelled set that cannot be read as documented; the message names the file."""


@dataclass(frozen=True)
class LabelledFaces:
    """Aligned crops, the identity of each (``None`` where a pairs file gives no identity) and
    the file each came from."""

    crops: np.ndarray
    identities: tuple[str | None, ...]
    paths: tuple[str, ...]


@dataclass(frozen=True)
class Pairs:
    """Indices into a ``LabelledFaces`` and whether each pair is the same person."""

    first: np.ndarray
    second: np.ndarray
    same: np.ndarray

    def __len__(self) -> int:
        return int(self.same.size)


def load_crop(path: Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """One aligned 112x112 BGR crop from ``path`` (a crop, or an image with a landmarks sidecar)."""
    try:
        image = decode_image(path.read_bytes(), max_pixels)
    except (OSError, ImageRejected) as exc:
        raise LabelledInputError(f"{path}: {exc}") from None
    sidecar = path.with_name(path.name + ".json")
    if sidecar.is_file():
        try:
            data = json.loads(sidecar.read_text())
            landmarks = np.asarray(data["landmarks"] if isinstance(data, dict) else data, dtype=np.float64)
            check_landmarks(landmarks, image.shape)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise LabelledInputError(f"{sidecar}: not usable landmarks for {path.name}: {exc}") from None
        return norm_crop(image, landmarks.astype(np.float32))
    if image.shape[:2] != (FACE_SIZE, FACE_SIZE):
        h, w = image.shape[:2]
        raise LabelledInputError(
            f"{path}: {w}x{h} is not an aligned {FACE_SIZE}x{FACE_SIZE} crop and has no landmarks "
            f"sidecar {sidecar.name}"
        )
    return image


def load_identity_dir(root: Path, max_pixels: int = DEFAULT_MAX_PIXELS,
                      min_identities: int = 2) -> LabelledFaces:
    """Every image under ``root/<identity>/`` (sorted, so the order is reproducible); a verification
    set needs two identities, a gallery enrollment (``min_identities=1``) one."""
    root = Path(root)
    if not root.is_dir():
        raise LabelledInputError(f"{root} is not a directory of <identity>/<image> files")
    crops, identities, paths = [], [], []
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        for image in sorted(folder.iterdir()):
            if image.is_file() and image.suffix.lower() in IMAGE_SUFFIXES:
                crops.append(load_crop(image, max_pixels))
                identities.append(folder.name)
                paths.append(str(image))
    if len(set(identities)) < min_identities or not crops:
        raise LabelledInputError(
            f"{root}: need images of at least {max(min_identities, 1)} identities in <identity>/<image> "
            "folders, found "
            f"{len(set(identities))} ({len(crops)} images)"
        )
    return LabelledFaces(np.stack(crops), tuple(identities), tuple(paths))


def identity_pairs(identities: tuple[str | None, ...], impostors: int | None, seed: int) -> Pairs:
    """All genuine pairs, and ``impostors`` impostor pairs drawn without replacement (default:
    as many as there are genuine pairs, capped by how many exist), shuffled together (seeded)."""
    labels = np.asarray(identities, dtype=object)
    genuine = [(i, j) for i, j in itertools.combinations(range(labels.size), 2) if labels[i] == labels[j]]
    if not genuine:
        raise LabelledInputError("no identity has two images: there is no genuine pair to evaluate")
    rng = np.random.default_rng(seed)
    different = [(i, j) for i, j in itertools.combinations(range(labels.size), 2) if labels[i] != labels[j]]
    count = min(len(different), len(genuine) if impostors is None else impostors)
    if count < 1:
        raise LabelledInputError("need at least one impostor pair")
    chosen = [different[k] for k in sorted(rng.choice(len(different), count, replace=False))]
    pairs = np.asarray(genuine + chosen)
    same = np.asarray([True] * len(genuine) + [False] * count)
    order = rng.permutation(len(same))
    return Pairs(pairs[order, 0], pairs[order, 1], same[order])


def load_pairs_file(path: Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[LabelledFaces, Pairs]:
    """A CSV/TSV with a header naming ``a``, ``b`` and ``same`` (1/0, true/false, same/diff);
    image paths relative to the file. Each image is read once, however many pairs name it."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise LabelledInputError(f"pairs file {path}: {exc}") from None
    lines = [line for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    dialect = "excel-tab" if lines and "\t" in lines[0] else "excel"
    reader = csv.DictReader(lines, dialect=dialect)
    missing = {"a", "b", "same"} - set(reader.fieldnames or ())
    if missing:
        raise LabelledInputError(f"{path}: the header must name a, b and same; missing {sorted(missing)}")
    index: dict[str, int] = {}
    crops, first, second, same = [], [], [], []
    for line_no, row in enumerate(reader, start=2):
        flag = (row["same"] or "").strip().lower()
        if flag not in _TRUE | _FALSE:
            raise LabelledInputError(
                f"{path}:{line_no}: same must be 1/0, true/false or same/diff, got {flag!r}")
        ids = []
        for key in ("a", "b"):
            rel = (row[key] or "").strip()
            if not rel:
                raise LabelledInputError(f"{path}:{line_no}: empty {key}")
            image = (path.parent / rel).resolve()
            if str(image) not in index:
                index[str(image)] = len(crops)
                crops.append(load_crop(image, max_pixels))
            ids.append(index[str(image)])
        first.append(ids[0])
        second.append(ids[1])
        same.append(flag in _TRUE)
    if not same:
        raise LabelledInputError(f"{path}: no pairs")
    faces = LabelledFaces(np.stack(crops), (None,) * len(crops), tuple(index))
    return faces, Pairs(np.asarray(first), np.asarray(second), np.asarray(same))
