"""Per-episode commit: staged rows -> final Parquet, templates, errors, ``_SUCCESS``.

Output layout (Hive-partitioned, so ``ray.data.read_parquet(out/"embeddings")``
and ``pyarrow.dataset`` see an ``episode_id`` column):

    <out>/embeddings/episode_id=<ep>/part-0.parquet   one row per embedded face
    <out>/embeddings/episode_id=<ep>/_SUCCESS         JSON: counts + engine info
    <out>/templates/episode_id=<ep>/part-0.parquet    per-track mean templates
    <out>/errors/episode_id=<ep>/part-0.parquet       rows that failed: reason, error

An episode is committed when its ``_SUCCESS`` exists: it is written last, after
every data file, and staging is deleted only after it. A crash anywhere leaves
either a committed episode or one whose staging still holds every finished row.
Duplicate uids (a retried task) are dropped here, so each face is written once.
Until ``_SUCCESS`` exists an episode's data files may be there, half of them new:
``reader.py`` reads committed episodes only. Every path is built from a safe
episode id (``ids.py``), and clean-up deletes the staging files the commit read and
the temporary files of crashed writes, nothing else.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from engines import EngineError

from .ids import require_safe_id
from .staging import embedding_array, read_staged, remove_staging, staged_files
from .storage import (
    Location,
    delete_files,
    exists,
    orphan_tmp_files,
    read_bytes,
    write_atomic,
    write_parquet_atomic,
)

logger = logging.getLogger(__name__)

SUCCESS = "_SUCCESS"
ROW_COLUMNS = ("track_id", "frame", "embedding", "norm", "model_id", "model_sha256", "backend",
               "precision", "contract", "source")
ERROR_COLUMNS = ("track_id", "frame", "source", "reason", "error")
TABLES = ("embeddings", "templates", "errors")


class IncompleteEpisode(EngineError):
    """Staging lacks rows the index expects: the pipeline did not finish them."""


@dataclass(frozen=True)
class EpisodeResult:
    episode_id: str
    rows: int
    errors: int
    tracks: int
    embedded: int  # rows of ``rows`` embedded by this run (not staged by an earlier one)


def partition(output: Location, table: str, episode: str) -> Location:
    """``<out>/<table>/episode_id=<episode>``, for a safe episode id only."""
    return output.join(table, f"episode_id={require_safe_id(episode)}")


def success_path(output: Location, episode: str) -> Location:
    return partition(output, "embeddings", episode).join(SUCCESS)


def read_success(output: Location, episode: str) -> dict[str, Any] | None:
    loc = success_path(output, episode)
    if not exists(loc):
        return None
    try:
        return json.loads(read_bytes(loc.fs, loc.path))
    except (OSError, ValueError):
        return None


def committed_episodes(output: Location, episodes: list[str]) -> dict[str, dict[str, Any]]:
    return {ep: m for ep in episodes if (m := read_success(output, ep)) is not None}


def _dedupe(table: pa.Table) -> pa.Table:
    uids = table["uid"].to_numpy(zero_copy_only=False)
    _, first = np.unique(uids, return_index=True)
    return table.take(pa.array(np.sort(first)))


def track_templates(rows: pa.Table) -> pa.Table:
    """Per-track mean embedding, re-normalised, with frame counts."""
    tracks = rows["track_id"].to_numpy(zero_copy_only=False)
    emb = rows["embedding"].combine_chunks().flatten().to_numpy().reshape(rows.num_rows, -1)
    names, inverse, counts = np.unique(tracks, return_inverse=True, return_counts=True)
    sums = np.zeros((len(names), emb.shape[1]), np.float64)
    np.add.at(sums, inverse, emb)
    norms = np.linalg.norm(sums, axis=1, keepdims=True)
    templates = (sums / np.where(norms > 0, norms, 1.0)).astype(np.float32)
    norm_mean = np.bincount(inverse, weights=rows["norm"].to_numpy()) / counts
    return pa.table({
        "track_id": pa.array(names.tolist(), pa.string()),
        "template": embedding_array(templates),
        "frame_count": pa.array(counts, pa.int64()),
        "mean_norm": pa.array(norm_mean.astype(np.float32)),
        "contract": pa.array([rows["contract"][0].as_py()] * len(names), pa.string()),
    })


def commit_episode(output: Location, episode: str, expected_uids: set[str], engine: dict[str, Any],
                   job: dict[str, Any], staged_before: frozenset[str] = frozenset()) -> EpisodeResult:
    """Write the final files of ``episode`` from staging, then ``_SUCCESS``, then clean up.
    ``staged_before``: uids an earlier run staged (not counted as embedded by this one)."""
    files = staged_files(output, episode)
    staged = read_staged(output, files)
    staged_set = set(staged["uid"].to_pylist()) if staged is not None else set()
    missing = expected_uids - staged_set
    if missing:
        raise IncompleteEpisode(
            f"episode {episode}: {len(missing)} of {len(expected_uids)} rows are not staged "
            f"(e.g. {sorted(missing)[:3]}); re-run the job to finish them"
        )
    table = _dedupe(staged.filter(pc.is_in(staged["uid"], pa.array(sorted(expected_uids)))))
    if "reason" not in table.column_names:  # staged by a version without reasons
        table = table.append_column("reason", pa.nulls(table.num_rows, pa.string()))
    contracts = set(table["contract"].to_pylist())
    if len(contracts) > 1:
        raise IncompleteEpisode(f"episode {episode}: rows from several embedding contracts {contracts}")
    failed = pc.not_equal(table["error"], "")
    good = table.filter(pc.invert(failed)).sort_by([("track_id", "ascending"), ("frame", "ascending")])
    bad = table.filter(failed)
    dirs = {name: partition(output, name, episode) for name in TABLES}
    for loc in dirs.values():  # a crash mid-write of an earlier commit left these
        delete_files(output.fs, orphan_tmp_files(loc))
    write_parquet_atomic(output.fs, dirs["embeddings"].join("part-0.parquet").path,
                         good.select(list(ROW_COLUMNS)))
    if good.num_rows:
        write_parquet_atomic(output.fs, dirs["templates"].join("part-0.parquet").path, track_templates(good))
    if bad.num_rows:
        write_parquet_atomic(output.fs, dirs["errors"].join("part-0.parquet").path,
                             bad.select(list(ERROR_COLUMNS)))
    embedded = len(set(good["uid"].to_pylist()) - staged_before)
    result = EpisodeResult(episode, good.num_rows, bad.num_rows, len(set(good["track_id"].to_pylist())),
                           embedded)
    manifest = {
        "episode_id": episode,
        "rows": result.rows,
        "errors": result.errors,
        "tracks": result.tracks,
        "inputs": len(expected_uids),
        "engine": {
            **engine,
            "backends": sorted(set(table["backend"].to_pylist())),
            "precisions": sorted(set(table["precision"].to_pylist())),
        },
        "contract": next(iter(contracts)) if contracts else engine.get("contract"),
        "committed_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "job": job,
    }
    loc = success_path(output, episode)
    write_atomic(loc.fs, loc.path, json.dumps(manifest, indent=2).encode())
    remove_staging(output, episode, files)
    logger.info("committed episode %s: %d rows, %d errors, %d tracks", episode, result.rows,
                result.errors, result.tracks)
    return result
