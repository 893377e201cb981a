"""Job inputs: a directory of aligned crops, or a Parquet manifest.

(a) ``<root>/<episode_id>/<track_id>/<frame>.{jpg,png}``: aligned 112x112 crops.
(b) a Parquet file (or directory of them) with ``episode_id, track_id, frame``
    and, per row, ``image`` (encoded bytes) or ``path`` (local, ``s3://`` or
    relative to the manifest), plus optional ``kps`` (5x2 landmarks as 10
    numbers): frames of any size are then aligned on the CPU stage.

``discover`` builds the *index*: one small row per expected face (``uid`` =
``episode/track/frame``), never the image bytes. The index is what resume
compares against (which uids are done) and what commits check completeness
against. Malformed inputs (missing columns, duplicate uids, nothing found)
are refused here, before any cluster work, with a message naming the problem.
"""

from __future__ import annotations

import logging
import posixpath
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from engines import ConfigError

from .storage import Location, exists, is_dir, list_files

logger = logging.getLogger(__name__)

INDEX_COLUMNS = ("uid", "episode_id", "track_id", "frame")


class InputError(ConfigError):
    """The job input is malformed; nothing was run."""


@dataclass(frozen=True)
class InputIndex:
    kind: str  # "directory" | "manifest"
    location: Location
    table: pa.Table  # uid, episode_id, track_id, frame[, path][, kps] (+ manifest: row)
    has_inline_images: bool = False
    manifest_files: tuple[str, ...] = ()

    @property
    def episodes(self) -> list[str]:
        return sorted(set(self.table.column("episode_id").to_pylist()))


def make_uid(episode: pa.Array, track: pa.Array, frame: pa.Array) -> pa.Array:
    return pc.binary_join_element_wise(episode, track, frame, "/")


def _check_unique(table: pa.Table, where: str) -> None:
    uids = table.column("uid")
    if len(pc.unique(uids)) != len(uids):
        counts = pc.value_counts(uids)
        dupes = [v["values"] for v in counts.to_pylist() if v["counts"] > 1][:5]
        raise InputError(f"{where}: duplicate (episode_id, track_id, frame) rows, e.g. {dupes}")


def _discover_directory(loc: Location, extensions: tuple[str, ...]) -> InputIndex:
    files = list_files(loc)
    rows: dict[str, list] = {"episode_id": [], "track_id": [], "frame": [], "path": []}
    misplaced = []
    exts = {e.lower().lstrip(".") for e in extensions}
    for info in files:
        rel = posixpath.relpath(info.path, loc.path)
        parts = rel.split("/")
        name, _, ext = parts[-1].rpartition(".")
        if len(parts) != 3 or ext.lower() not in exts or not name or parts[-1].startswith("."):
            misplaced.append(rel)
            continue
        rows["episode_id"].append(parts[0])
        rows["track_id"].append(parts[1])
        rows["frame"].append(name)
        rows["path"].append(info.path)
    if misplaced:
        logger.warning(
            "%d file(s) under %s are not <episode>/<track>/<frame>.{%s} and are ignored, e.g. %s",
            len(misplaced), loc.uri, ",".join(sorted(exts)), misplaced[:3],
        )
    if not rows["path"]:
        raise InputError(
            f"no input crops under {loc.uri}: expected <episode_id>/<track_id>/<frame>.{{jpg,png}}"
        )
    table = pa.table({k: pa.array(v, pa.string()) for k, v in rows.items()})
    table = table.add_column(0, "uid", make_uid(table["episode_id"], table["track_id"], table["frame"]))
    _check_unique(table, loc.uri)
    return InputIndex("directory", loc, table.sort_by([("uid", "ascending")]))


def _manifest_files(loc: Location) -> list[str]:
    if is_dir(loc):
        return sorted(i.path for i in list_files(loc) if i.path.endswith(".parquet"))
    return [loc.path]


def _discover_manifest(loc: Location) -> InputIndex:
    files = _manifest_files(loc)
    if not files:
        raise InputError(f"no .parquet manifest files under {loc.uri}")
    schema = pq.read_schema(files[0], filesystem=loc.fs)
    names = set(schema.names)
    missing = [c for c in ("episode_id", "track_id", "frame") if c not in names]
    if missing:
        raise InputError(f"manifest {loc.uri} lacks column(s) {missing}; it has {sorted(names)}")
    if "image" not in names and "path" not in names:
        raise InputError(f"manifest {loc.uri} needs an 'image' (bytes) or a 'path' column")
    columns = ["episode_id", "track_id", "frame"] + [c for c in ("path", "kps") if c in names]
    tables = []
    for f in files:
        t = pq.read_table(f, columns=columns, filesystem=loc.fs)
        tables.append(t)
    table = pa.concat_tables(tables)
    table = table.set_column(0, "episode_id", pc.cast(table["episode_id"], pa.string()))
    table = table.set_column(1, "track_id", pc.cast(table["track_id"], pa.string()))
    table = table.set_column(2, "frame", pc.cast(table["frame"], pa.string()))
    for col in ("episode_id", "track_id", "frame"):
        if table[col].null_count:
            raise InputError(f"manifest {loc.uri}: column {col!r} has {table[col].null_count} null value(s)")
    table = table.add_column(0, "uid", make_uid(table["episode_id"], table["track_id"], table["frame"]))
    _check_unique(table, loc.uri)
    return InputIndex("manifest", loc, table, has_inline_images="image" in names, manifest_files=tuple(files))


def discover(loc: Location, extensions: tuple[str, ...] = ("jpg", "jpeg", "png")) -> InputIndex:
    """Index the input at ``loc`` (a directory layout or a Parquet manifest)."""
    if not exists(loc):
        raise InputError(f"input {loc.uri} does not exist")
    if loc.path.endswith(".parquet") or (
        is_dir(loc) and any(i.path.endswith(".parquet") for i in list_files(loc, recursive=False))
    ):
        return _discover_manifest(loc)
    if not is_dir(loc):
        raise InputError(f"input {loc.uri} is neither a directory of crops nor a .parquet manifest")
    return _discover_directory(loc, extensions)
