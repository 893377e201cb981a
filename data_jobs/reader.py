"""Reading the job's output: committed episodes only.

An episode's data files are written before its ``_SUCCESS`` (``commit.py``), so a reader
that globs ``embeddings/`` while a job runs, or after one crashed mid-commit, can see rows
of an episode that is not committed: its rows may be rewritten by the next run. These
functions list the ``_SUCCESS`` markers first and read only those episodes' files, with
``episode_id`` always a string (Hive partition inference would turn ``001`` into 1)::

    from data_jobs.reader import read_committed, committed_files
    rows = read_committed("/data/out")                       # embeddings, a pyarrow Table
    templates = read_committed("s3://bucket/out", "templates", endpoint_url="http://minio:9000")
    # Ray Data: ray.data.read_parquet(committed_files(out), filesystem=...) (see the README)
"""

from __future__ import annotations

import posixpath

import pyarrow as pa
import pyarrow.dataset as pads

from engines import Location, list_files, locate

from .commit import SUCCESS, TABLES

PARTITIONING = pads.partitioning(pa.schema([("episode_id", pa.string())]), flavor="hive")


def _location(output: str | Location, endpoint_url: str | None, region: str | None) -> Location:
    return output if isinstance(output, Location) else locate(output, endpoint_url, region)


def _episode_of(path: str) -> str | None:
    """``.../episode_id=E/<file>`` -> ``E``."""
    directory = posixpath.basename(posixpath.dirname(path))
    return directory[len("episode_id="):] if directory.startswith("episode_id=") else None


def committed_episodes(output: str | Location, endpoint_url: str | None = None,
                       region: str | None = None) -> list[str]:
    """Episodes of ``output`` whose ``_SUCCESS`` exists (one listing of ``embeddings/``)."""
    loc = _location(output, endpoint_url, region)
    found = {_episode_of(i.path) for i in list_files(loc.join("embeddings")) if i.base_name == SUCCESS}
    return sorted(e for e in found if e)


def committed_files(output: str | Location, table: str = "embeddings", endpoint_url: str | None = None,
                    region: str | None = None) -> list[str]:
    """The Parquet files of ``table`` (``embeddings``, ``templates`` or ``errors``) of committed
    episodes: paths inside ``output``'s filesystem (bucket/key on S3)."""
    if table not in TABLES:
        raise ValueError(f"table must be one of {list(TABLES)}, got {table!r}")
    loc = _location(output, endpoint_url, region)
    done = set(committed_episodes(loc))
    return sorted(i.path for i in list_files(loc.join(table))
                  if i.base_name.endswith(".parquet") and not i.base_name.startswith((".", "_"))
                  and _episode_of(i.path) in done)


def read_committed(output: str | Location, table: str = "embeddings", columns: list[str] | None = None,
                   endpoint_url: str | None = None, region: str | None = None) -> pa.Table:
    """Rows of ``table`` of every committed episode, with an ``episode_id`` (string) column."""
    loc = _location(output, endpoint_url, region)
    files = committed_files(loc, table)
    if not files:
        return pa.table({"episode_id": pa.array([], pa.string())})
    dataset = pads.dataset(files, filesystem=loc.fs, format="parquet", partitioning=PARTITIONING,
                           partition_base_dir=loc.join(table).path)
    return dataset.to_table(columns=columns)
