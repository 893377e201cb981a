"""Staging: where embedded rows land before their episode is committed.

``StagingDatasink`` (a Ray Data ``Datasink``, so writes run as distributed
tasks) writes each block's rows, grouped by episode, to
``<output>/_staging/<episode_id>/<name>.parquet``. The file name is a hash of
the uids it holds, so a write task Ray retries after a worker died rewrites
the *same* file instead of adding a duplicate; each file appears atomically.
After a crash, the staged uids are exactly the rows that need no recompute.
"""

from __future__ import annotations

import hashlib
import logging
import os
import signal
from collections.abc import Iterable
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from ray.data import Datasink
from ray.data.block import BlockAccessor

from .storage import Location, list_files, write_parquet_atomic

logger = logging.getLogger(__name__)

STAGING_DIR = "_staging"


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

    def __init__(self, output: Location, fault: dict[str, Any] | None = None) -> None:
        self.output = output
        self.fault = fault or {}

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
                uids = "\n".join(sorted(part["uid"].to_pylist()))
                name = hashlib.sha1(uids.encode()).hexdigest()[:20]
                path = self.output.join(STAGING_DIR, episode, f"{name}.parquet").path
                write_parquet_atomic(self.output.fs, path, part.drop_columns(["episode_id"]))
                written += part.num_rows
            self._maybe_crash_driver()
        return written

    def _maybe_crash_driver(self) -> None:
        """Fault injection for tests: kill the job's driver once K staging files exist."""
        after, pid = self.fault.get("crash_driver_after_files"), self.fault.get("driver_pid")
        if after is None or pid is None:
            return
        if len(list_files(self.output.join(STAGING_DIR))) >= after:
            logger.warning("fault injection: killing driver pid %s", pid)
            os.kill(int(pid), signal.SIGKILL)


def staged_uids(output: Location) -> dict[str, set[str]]:
    """episode_id -> uids already staged (readable files only; others are ignored)."""
    done: dict[str, set[str]] = {}
    root = output.join(STAGING_DIR)
    for info in list_files(root):
        if not info.path.endswith(".parquet"):
            continue
        episode = info.path.rsplit("/", 2)[-2]
        try:
            uids = pq.read_table(info.path, columns=["uid"], filesystem=output.fs)["uid"].to_pylist()
        except (OSError, pa.ArrowInvalid) as exc:
            logger.warning("ignoring unreadable staging file %s: %s", info.path, exc)
            continue
        done.setdefault(episode, set()).update(uids)
    return done


def read_staged(output: Location, episode: str) -> pa.Table | None:
    files = [i.path for i in list_files(output.join(STAGING_DIR, episode)) if i.path.endswith(".parquet")]
    tables = []
    for path in sorted(files):
        try:
            tables.append(pq.read_table(path, filesystem=output.fs))
        except (OSError, pa.ArrowInvalid) as exc:
            logger.warning("ignoring unreadable staging file %s: %s", path, exc)
    if not tables:
        return None
    return pa.concat_tables(tables, promote_options="permissive")
