"""``arcface sample-episodes``: a small episode dataset from the faces insightface ships.

Each track follows one real face (the group photo's six and Tom Hanks) through
``frames`` frames with light per-frame jitter (landmark noise, brightness,
occasional mirroring), like consecutive detections in a video. Two layouts:

- ``<out>/episodes/<episode>/<track>/<frame>.jpg``: aligned 112x112 crops;
- ``<out>/manifest/manifest.parquet``: the same faces, half as inline encoded
  crops (``image``), half as un-aligned frames on disk (``path`` + ``kps``) that
  the job aligns on its CPU stage.

``corrupt`` adds undecodable files to both layouts, which the job must report
in its errors table without stopping.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from engines import ARCFACE_TEMPLATE, SourceFace, jitter_face, source_faces

FRAME_MARGIN = 96  # pixels of context around a face in un-aligned manifest frames


@dataclass(frozen=True)
class SampleSummary:
    root: str
    directory: str
    manifest: str
    episodes: int
    tracks_per_episode: int
    frames_per_track: int
    faces: int
    corrupt: int

    @property
    def decodable(self) -> int:
        return self.faces


def _frame_around(face: SourceFace, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """An un-aligned frame: a window of the source image around the face, and its kps."""
    kps = face.landmarks.astype(np.float64) + rng.normal(0.0, 1.0, (5, 2))
    h, w = face.image.shape[:2]
    x0 = int(max(0, kps[:, 0].min() - FRAME_MARGIN))
    y0 = int(max(0, kps[:, 1].min() - FRAME_MARGIN))
    x1 = int(min(w, kps[:, 0].max() + FRAME_MARGIN))
    y1 = int(min(h, kps[:, 1].max() + FRAME_MARGIN))
    frame = np.ascontiguousarray(face.image[y0:y1, x0:x1])
    gain = 1.0 + rng.normal(0.0, 0.06)
    frame = np.clip(frame.astype(np.float32) * gain, 0, 255).astype(np.uint8)
    return frame, (kps - [x0, y0]).astype(np.float32)


def make_sample_episodes(out: str | Path, episodes: int = 2, tracks: int = 3, frames: int = 8,
                         corrupt: int = 0, seed: int = 0, jitter: float = 0.5,
                         mirror: bool = True) -> SampleSummary:
    """``jitter``: the per-frame ``jitter_face`` strength; ``mirror``: one crop in four mirrored.
    Identity tests and the gallery demo use ``jitter=0.05, mirror=False``, where synthetic
    weights still keep a track nearer its own face than any other (README "Gallery and identify")."""
    if min(episodes, tracks, frames) < 1 or corrupt < 0:
        raise ValueError("episodes, tracks and frames must be >= 1 and corrupt >= 0")
    root = Path(out)
    directory = root / "episodes"
    manifest_dir = root / "manifest"
    frames_dir = manifest_dir / "frames"
    frames_dir.mkdir(parents=True, exist_ok=True)
    sources = source_faces()
    rng = np.random.default_rng(seed)
    rows: dict[str, list] = {k: [] for k in ("episode_id", "track_id", "frame", "image", "path", "kps")}
    faces = 0
    for e in range(episodes):
        episode = f"ep{e:03d}"
        for t in range(tracks):
            track = f"track{t:03d}"
            source = sources[(e * tracks + t) % len(sources)]
            (directory / episode / track).mkdir(parents=True, exist_ok=True)
            for f in range(frames):
                frame = f"{f:05d}"
                crop = jitter_face(source, rng, strength=jitter, mirror=mirror)
                _, jpg = cv2.imencode(".jpg", crop, [cv2.IMWRITE_JPEG_QUALITY, 95])
                (directory / episode / track / f"{frame}.jpg").write_bytes(jpg.tobytes())
                rows["episode_id"].append(episode)
                rows["track_id"].append(track)
                rows["frame"].append(frame)
                if f % 2 == 0 or source.image_file.endswith(".png"):
                    rows["image"].append(jpg.tobytes())
                    rows["path"].append(None)
                    rows["kps"].append(None)
                else:
                    full, kps = (
                        _frame_around(source, rng) if source.image.shape[0] > 112
                        else (source.image, ARCFACE_TEMPLATE + rng.normal(0, 0.5, (5, 2)).astype(np.float32))
                    )
                    name = f"{episode}_{track}_{frame}.jpg"
                    cv2.imwrite(str(frames_dir / name), full, [cv2.IMWRITE_JPEG_QUALITY, 95])
                    rows["image"].append(None)
                    rows["path"].append(f"frames/{name}")
                    rows["kps"].append(kps.reshape(-1).tolist())
                faces += 1
    for c in range(corrupt):
        episode, track = f"ep{c % episodes:03d}", "track000"
        frame = f"{90000 + c:05d}"
        garbage = rng.integers(0, 256, 600, dtype=np.uint8).tobytes()
        (directory / episode / track / f"{frame}.jpg").write_bytes(garbage)
        for key, value in (("episode_id", episode), ("track_id", track), ("frame", frame),
                           ("image", garbage), ("path", None), ("kps", None)):
            rows[key].append(value)
    table = pa.table({
        "episode_id": pa.array(rows["episode_id"], pa.string()),
        "track_id": pa.array(rows["track_id"], pa.string()),
        "frame": pa.array(rows["frame"], pa.string()),
        "image": pa.array(rows["image"], pa.binary()),
        "path": pa.array(rows["path"], pa.string()),
        "kps": pa.array(rows["kps"], pa.list_(pa.float32())),
    })
    pq.write_table(table, manifest_dir / "manifest.parquet")
    summary = SampleSummary(str(root), str(directory), str(manifest_dir / "manifest.parquet"),
                            episodes, tracks, frames, faces, corrupt)
    (root / "sample.json").write_text(json.dumps(asdict(summary), indent=2))
    return summary


POOL_VARIANTS = 16  # jittered crops encoded per source face for a synthetic manifest


@dataclass(frozen=True)
class SyntheticSummary:
    root: str
    manifest: str
    episodes: int
    tracks_per_episode: int
    faces: int
    pool_files: int


def make_synthetic_manifest(out: str | Path, faces: int, episodes: int = 10, tracks: int = 10,
                            seed: int = 0) -> SyntheticSummary:
    """A Parquet manifest of ``faces`` rows over ``episodes`` x ``tracks`` tracks, made in seconds
    at any size: the rows point (``path``, relative) at a small pool of jittered aligned crops
    (``POOL_VARIANTS`` per source face; a track follows one face), so only the manifest grows
    with ``faces``. Each row also carries what a detector writes, as pass-through columns of
    several Arrow types: ``timestamp`` (timestamp[ms, UTC]), ``box`` (4 float32: x, y, w, h),
    ``det_score`` (float32) and ``shot_id`` (string). For scale runs (README "Scale")."""
    if min(faces, episodes, tracks) < 1:
        raise ValueError("faces, episodes and tracks must be >= 1")
    root = Path(out)
    pool_dir = root / "manifest" / "pool"
    pool_dir.mkdir(parents=True, exist_ok=True)
    sources = source_faces()
    rng = np.random.default_rng(seed)
    for s, source in enumerate(sources):
        for v in range(POOL_VARIANTS):
            cv2.imwrite(str(pool_dir / f"s{s:02d}_{v:02d}.jpg"), jitter_face(source, rng, strength=0.5),
                        [cv2.IMWRITE_JPEG_QUALITY, 95])
    i = np.arange(faces)
    per_track = -(-faces // (episodes * tracks))  # frames per track; the last track may be shorter
    episode = i // (tracks * per_track)
    track = (i // per_track) % tracks
    frame = i % per_track
    source = (episode * tracks + track) % len(sources)
    variant = frame % POOL_VARIANTS
    paths = np.char.add(np.char.add(np.char.add("pool/s", np.char.zfill(source.astype(str), 2)), "_"),
                        np.char.add(np.char.zfill(variant.astype(str), 2), ".jpg"))
    start = np.datetime64("2026-01-01T00:00:00", "ms").astype(np.int64)
    table = pa.table({
        "episode_id": pa.array(np.char.add("ep", np.char.zfill(episode.astype(str), 4)), pa.string()),
        "track_id": pa.array(np.char.add("track", np.char.zfill(track.astype(str), 3)), pa.string()),
        "frame": pa.array(np.char.zfill(frame.astype(str), 6), pa.string()),
        "path": pa.array(paths, pa.string()),
        "timestamp": pa.array(start + frame * 40 + episode * 3_600_000, pa.timestamp("ms", tz="UTC")),
        "box": pa.FixedSizeListArray.from_arrays(
            pa.array(rng.uniform(0, 1000, faces * 4).astype(np.float32)), 4),
        "det_score": pa.array(rng.uniform(0.5, 1.0, faces).astype(np.float32)),
        "shot_id": pa.array(np.char.add("shot", (frame // 50).astype(str)), pa.string()),
    })
    manifest = root / "manifest" / "manifest.parquet"
    pq.write_table(table, manifest, row_group_size=65536)
    return SyntheticSummary(str(root), str(manifest), int(episode.max()) + 1, tracks, faces,
                            len(sources) * POOL_VARIANTS)
