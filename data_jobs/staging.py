"""Staging: where embedded rows land before their episode is committed.

``StagingDatasink`` (a Ray Data ``Datasink``, so writes run as distributed
tasks) writes each block's rows, grouped by episode, to
``<output>/_staging/<episode_id>/<name>.parquet``. The file name is a hash of
the uids it holds, so a write task Ray retries after a worker died rewrites
the *same* file instead of adding a duplicate; each file appears atomically.
After a crash, the staged uids are exactly the rows that need no recompute.
Each write also tells the job's ``StagingTracker`` (``scheduler.py``) which episode
it added rows to, so an episode is committed as soon as its rows are all staged.

The job owns ``_staging/`` and nothing in it but files named ``STAGED_NAME`` (and
``write_atomic``'s temporary files): those are what it reads back, and all it ever
deletes; a foreign file keeps its directory.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from ray.data import Datasink
from ray.data.block import BlockAccessor

from engines import (
    Location,
    delete_files,
    list_files,
    orphan_tmp_files,
    remove_dir_if_empty,
    write_parquet_atomic,
)

from .ids import require_safe_id

logger = logging.getLogger(__name__)

STAGING_DIR = "_staging"
STAGED_NAME = re.compile(r"[0-9a-f]{20}\.parquet")


def staging_dir(output: Location, episode: str) -> Location:
    return output.join(STAGING_DIR, require_safe_id(episode))


def staged_name(uids: list[str]) -> str:
    """The file name of a staged part: a hash of its sorted uids (a retried write rewrites it)."""
    return hashlib.sha1("\n".join(sorted(uids)).encode()).hexdigest()[:20] + ".parquet"


def embedding_array(values: Any, dim: int | None = None) -> pa.FixedSizeListArray:
    """(N, D) float32 -> ``fixed_size_list<float32, D>`` (what readers get per row)."""
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    if isinstance(values, pa.FixedSizeListArray):
        return values
    if isinstance(values, pa.ExtensionArray):  # Ray's tensor extension type
        values = values.to_numpy_ndarray()
    array = np.ascontiguousarray(np.asarray(values, dtype=np.float32))
    dim = dim or array.shape[1]
    return pa.FixedSizeListArray.from_arrays(pa.array(array.reshape(-1), pa.float32()), dim)


def normalize_rows(table: pa.Table) -> pa.Table:
    """Ray block -> plain Arrow table with a fixed-size-list ``embedding`` column."""
    idx = table.schema.get_field_index("embedding")
    return table.set_column(idx, "embedding", embedding_array(table.column("embedding")))


class StagingDatasink(Datasink):
    """Writes embedded rows to per-episode staging files (see module docstring)."""

    def __init__(self, output: Location, tracker: Any = None) -> None:
        self.output = output
        self.tracker = tracker  # a StagingTracker actor handle, or None

    def get_name(self) -> str:
        return "EpisodeStaging"

    def write(self, blocks: Iterable, ctx) -> int:
        written = 0
        for block in blocks:
            table = BlockAccessor.for_block(block).to_arrow()
            if table.num_rows == 0:
                continue
            table = normalize_rows(table)
            for episode in pc.unique(table["episode_id"]).to_pylist():
                part = table.filter(pc.equal(table["episode_id"], episode))
                name = staged_name(part["uid"].to_pylist())
                write_parquet_atomic(self.output.fs, staging_dir(self.output, episode).join(name).path,
                                     part.drop_columns(["episode_id"]))
                written += part.num_rows
                if self.tracker is not None:  # fire and forget: a lost report only delays a commit
                    good = pc.sum(pc.equal(part["error"], "")).as_py() or 0
                    self.tracker.staged.remote(episode, name, part.num_rows, good)
        return written


@dataclass
class StagedEpisode:
    """What ``_staging/<episode>/`` holds: its staging files, their uids, and the embedding
    contract (-> model id) of their rows."""

    files: list[str] = field(default_factory=list)
    uids: set[str] = field(default_factory=set)
    contracts: dict[str, str] = field(default_factory=dict)


def _read_part(output: Location, path: str, columns: list[str] | None = None) -> pa.Table | None:
    try:
        return pq.read_table(path, columns=columns, filesystem=output.fs)
    except (OSError, pa.ArrowInvalid) as exc:
        logger.warning("ignoring unreadable staging file %s: %s", path, exc)
        return None


def list_staged(output: Location, episodes: set[str]) -> dict[str, StagedEpisode]:
    """episode -> what is staged for it, for the ``episodes`` of this input (one listing; a
    staged episode of another input is left alone). Unreadable files are skipped: their
    rows are recomputed and the file is rewritten."""
    found: dict[str, StagedEpisode] = {}
    root = output.join(STAGING_DIR)
    for info in list_files(root):
        parts = info.path[len(root.path) + 1 :].split("/")
        if len(parts) != 2 or parts[0] not in episodes or not STAGED_NAME.fullmatch(parts[1]):
            continue
        table = _read_part(output, info.path, ["uid", "contract", "model_id"])
        if table is None:
            continue
        staged = found.setdefault(parts[0], StagedEpisode())
        staged.files.append(info.path)
        staged.uids.update(table["uid"].to_pylist())
        pairs = zip(table["contract"].to_pylist(), table["model_id"].to_pylist(), strict=True)
        for contract, model in set(pairs):
            staged.contracts.setdefault(contract, model)
    return found


def staged_files(output: Location, episode: str) -> list[str]:
    return sorted(i.path for i in list_files(staging_dir(output, episode), recursive=False)
                  if STAGED_NAME.fullmatch(i.base_name))


def read_staged(output: Location, files: list[str]) -> pa.Table | None:
    """The rows of the staging ``files`` of one episode (unreadable files skipped)."""
    tables = [t for path in files if (t := _read_part(output, path)) is not None]
    if not tables:
        return None
    return pa.concat_tables(tables, promote_options="permissive")


def delete_staged(output: Location, episode: str, files: list[str]) -> None:
    """Delete the staging ``files`` a commit of ``episode`` read, then its directory if nothing
    else is in it. Temporary files are left alone: while the job runs, a duplicate write (a
    retried task) may be in the middle of one; ``remove_staging`` takes them when none can be.
    The ``_staging`` root stays while the job runs (the writes of other episodes create their
    directories in it); ``remove_staging_root`` takes it at the end."""
    delete_files(output.fs, files)
    remove_dir_if_empty(staging_dir(output, episode))


def remove_staging_root(output: Location) -> None:
    """The ``_staging`` directory, if nothing is left in it. When no staging write is in flight."""
    remove_dir_if_empty(output.join(STAGING_DIR))


def remove_staging(output: Location, episode: str, files: list[str]) -> None:
    """Delete the staging ``files`` of a committed ``episode`` (the leftovers of a commit cut short,
    or a duplicate write that landed after the commit), the temporary files a crashed write left
    beside them, then the directories if nothing else is in them. At the job's start and end only,
    when no staging write is in flight."""
    delete_files(output.fs, orphan_tmp_files(staging_dir(output, episode)))
    delete_staged(output, episode, files)
