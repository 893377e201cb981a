"""Per-episode commit: staged rows -> final Parquet, templates, errors, ``_SUCCESS``.

Output layout (Hive-partitioned, so ``ray.data.read_parquet(out/"embeddings")``
and ``pyarrow.dataset`` see an ``episode_id`` column):

    <out>/embeddings/episode_id=<ep>/part-0.parquet   one row per embedded face
    <out>/embeddings/episode_id=<ep>/_SUCCESS         JSON: counts + engine info
    <out>/templates/episode_id=<ep>/part-0.parquet    per-track templates (quality.py)
    <out>/errors/episode_id=<ep>/part-0.parquet       rows that failed: reason, error

``commit_episode`` runs as a Ray task (``commit_task``), on the cluster, as soon as
the scheduler (``scheduler.py``) sees every row of the episode staged: the driver
hands it the episode's expected uids and gets back counts, never rows or vectors.
An episode is committed when its ``_SUCCESS`` exists: it is written last, after
every data file, and staging is deleted only after it. A crash anywhere (the task's
worker, or the driver) leaves either a committed episode or one whose staging still
holds every finished row; a commit Ray retries after its worker died finds either
its own half-written files (rewritten) or its ``_SUCCESS`` (and only cleans up).
Duplicate uids (a retried task) are dropped here, so each face is written once.
A commit started on a hint that turns out early (some rows not staged yet) writes
nothing and says so (``incomplete``); the scheduler tries again later.
Until ``_SUCCESS`` exists an episode's data files may be there, half of them new:
``reader.py`` reads committed episodes only. Every path is built from a safe
episode id (``ids.py``), and clean-up deletes the staging files the commit read,
nothing else (temporary files of crashed writes are removed at the job's start and
end, when no write can be in flight).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from engines import (
    EngineError,
    Location,
    delete_files,
    exists,
    orphan_tmp_files,
    read_bytes,
    write_atomic,
    write_parquet_atomic,
)

from .columns import ERROR_COLUMNS, ROW_COLUMNS
from .partitions import partition
from .quality import TemplatePolicy, counted_crops, track_templates
from .staging import delete_staged, read_staged, staged_files

logger = logging.getLogger(__name__)

SUCCESS = "_SUCCESS"
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


@dataclass(frozen=True)
class CommitRequest:
    """What one episode's commit task needs: small (the episode's uids, never its rows)."""

    episode: str
    expected: pa.Array  # uids the index expects (string)
    engine: dict[str, Any]
    job: dict[str, Any]
    policy: TemplatePolicy = field(default_factory=TemplatePolicy)
    pass_through: pa.Schema = field(default_factory=lambda: pa.schema([]))
    staged_before: pa.Array = field(default_factory=lambda: pa.array([], pa.string()))  # earlier runs' rows
    store: Any = None  # a lance_store.StoreTarget when the Lance sink is on


@dataclass(frozen=True)
class CommitOutcome:
    """``result`` when committed (now, or by an earlier attempt: ``already``); ``missing`` rows
    when the episode was not complete yet (nothing written)."""

    episode: str
    result: EpisodeResult | None = None
    missing: int = 0
    already: bool = False
    store_fragments: bytes | None = None  # pickled Lance fragments (lance_store.py), if a store is on


def _with_pass_through(table: pa.Table, columns: tuple[str, ...], pass_through: pa.Schema) -> pa.Table:
    """``columns`` then every pass-through column, typed as the manifest's unified schema (a
    column a block lacked, or had as nulls only, comes back with its type)."""
    out = table.select(list(columns))
    for f in pass_through:
        values = table[f.name] if f.name in table.column_names else pa.nulls(table.num_rows, f.type)
        out = out.append_column(f, values.cast(f.type) if values.type != f.type else values)
    return out


def _already_committed(output: Location, request: CommitRequest, files: list[str]) -> CommitOutcome | None:
    manifest = read_success(output, request.episode)
    if manifest is None:
        return None
    delete_staged(output, request.episode, files)  # a retried commit: the first attempt wrote _SUCCESS
    result = EpisodeResult(request.episode, manifest["rows"], manifest["errors"], manifest["tracks"],
                           manifest.get("embedded", 0))
    return CommitOutcome(request.episode, result, already=True)


def commit_episode(output: Location, request: CommitRequest) -> CommitOutcome:
    """Write the final files of ``request.episode`` from staging, then ``_SUCCESS``, then clean up."""
    episode = request.episode
    files = staged_files(output, episode)
    done = _already_committed(output, request, files)
    if done is not None:
        return done
    staged = read_staged(output, files)
    expected = request.expected
    if staged is None:
        return CommitOutcome(episode, missing=len(expected))
    present = pc.is_in(expected, staged["uid"])
    missing = len(expected) - pc.sum(present).as_py() if len(expected) else 0
    if missing:
        return CommitOutcome(episode, missing=missing)
    table = _dedupe(staged.filter(pc.is_in(staged["uid"], expected)))
    if "reason" not in table.column_names:  # staged by a version without reasons
        table = table.append_column("reason", pa.nulls(table.num_rows, pa.string()))
    contracts = set(pc.unique(table["contract"]).to_pylist())
    if len(contracts) > 1:
        raise IncompleteEpisode(f"episode {episode}: rows from several embedding contracts {contracts}")
    failed = pc.not_equal(table["error"], "")
    good = table.filter(pc.invert(failed)).sort_by([("track_id", "ascending"), ("frame", "ascending")])
    bad = table.filter(failed)
    counted = counted_crops(good["track_id"].to_numpy(zero_copy_only=False),
                            good["frame"].to_numpy(zero_copy_only=False), good["norm"].to_numpy(),
                            request.policy)
    good = good.append_column("in_template", pa.array(counted))
    rows = _with_pass_through(good, ROW_COLUMNS, request.pass_through)
    templates = track_templates(good, counted, request.policy) if good.num_rows else None
    dirs = {name: partition(output, name, episode) for name in TABLES}
    for loc in dirs.values():  # a crash mid-write of an earlier attempt left these (one commit per episode)
        delete_files(output.fs, orphan_tmp_files(loc))
    write_parquet_atomic(output.fs, dirs["embeddings"].join("part-0.parquet").path, rows)
    if templates is not None:
        write_parquet_atomic(output.fs, dirs["templates"].join("part-0.parquet").path, templates)
    if bad.num_rows:
        write_parquet_atomic(output.fs, dirs["errors"].join("part-0.parquet").path,
                             _with_pass_through(bad, ERROR_COLUMNS, request.pass_through))
    earlier = pc.sum(pc.is_in(good["uid"], request.staged_before)).as_py() if good.num_rows else 0
    embedded = good.num_rows - (earlier or 0)
    result = EpisodeResult(episode, good.num_rows, bad.num_rows, len(pc.unique(good["track_id"])), embedded)
    manifest = {
        "episode_id": episode,
        "rows": result.rows,
        "errors": result.errors,
        "tracks": result.tracks,
        "inputs": len(expected),
        "embedded": result.embedded,
        "templates": {"min_quality": request.policy.min_quality,
                      "max_crops_per_track": request.policy.max_crops_per_track,
                      "weighting": request.policy.weighting,
                      "crops_used": int(counted.sum())},
        "engine": {
            **request.engine,
            "backends": sorted(pc.unique(table["backend"]).to_pylist()),
            "precisions": sorted(pc.unique(table["precision"]).to_pylist()),
        },
        "contract": next(iter(contracts)) if contracts else request.engine.get("contract"),
        "committed_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "job": request.job,
    }
    loc = success_path(output, episode)
    write_atomic(loc.fs, loc.path, json.dumps(manifest, indent=2).encode())
    delete_staged(output, episode, files)
    logger.info("committed episode %s: %d rows, %d errors, %d tracks", episode, result.rows,
                result.errors, result.tracks)
    return CommitOutcome(episode, result, store_fragments=_store_fragments(request, rows, templates))


def _store_fragments(request: CommitRequest, rows: pa.Table, templates: pa.Table | None) -> bytes | None:
    """The episode's Lance fragments when a store is on; None otherwise, or when writing them
    failed: the job's end backfills the episode from its committed files."""
    if request.store is None:
        return None
    from .lance_store import episode_fragments

    try:
        return episode_fragments(request.store, request.episode, rows, templates)
    except Exception as exc:  # the episode is committed; the store catches up at the job's end
        logger.warning("episode %s: Lance fragments not written (%s); backfilled at the end",
                       request.episode, exc)
        return None

