"""Job inputs: a directory of aligned crops, or a Parquet manifest.

(a) ``<root>/<episode_id>/<track_id>/<frame>.{jpg,png}``: aligned 112x112 crops.
(b) a Parquet file (or directory of them) with ``episode_id, track_id, frame``
    and, per row, ``image`` (encoded bytes) or ``path`` (local, ``s3://`` or
    relative to the manifest), plus optional ``kps`` (5x2 landmarks as 10
    numbers): frames of any size are then aligned on the CPU stage. Any other
    column is carried to the output unchanged (``columns.py``); the index records
    their schema, never their values, which the cluster reads.

``discover`` builds the *index*: one small row per expected face (``uid`` =
``episode/track/frame``), never the image bytes. The index is what resume
compares against (which uids are done) and what commits check completeness
against. Malformed inputs (missing columns, columns of the wrong type, ids outside
the safe alphabet of ``ids.py``, duplicate uids, nothing found, a symbolic link that
makes one directory two episodes) are refused here, before any cluster work, with a
message naming the problem and the paths or values.
"""

from __future__ import annotations

import logging
import posixpath
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from engines import ConfigError, Location, exists, is_dir, list_files

from .columns import ColumnClash, pass_through_schema
from .ids import ID_COLUMNS, SAFE_ID, SAFE_ID_RULE, is_safe_id, unsafe_ids
from .safe_read import InputRefused, show_path, walk_local

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
    # manifest columns carried to the output (their unified schema over every file)
    pass_through: pa.Schema = field(default_factory=lambda: pa.schema([]))

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


def _unsafe_message(where: str, what: str, examples: list[str]) -> str:
    return (f"{where}: {what} that cannot be used as episode_id / track_id / frame, e.g. "
            f"{', '.join(examples)}; "
            f"ids must be {SAFE_ID_RULE} (they become directory names and row keys)")


def _directory_candidates(loc: Location) -> tuple[list[tuple[tuple[str, ...], str]], list[str]]:
    """(parts relative to the root, path) of every entry three levels down, and the misplaced ones."""
    if isinstance(loc.fs, pafs.LocalFileSystem):
        tree = walk_local(loc.path, depth=3)
        if tree.aliases:
            link, first = tree.aliases[0]
            raise InputError(
                f"{show_path(link)} and {show_path(first)} are the same directory (a symbolic link): its "
                f"frames would be embedded twice, under two ids ({len(tree.aliases)} such link(s)); remove "
                "the link, or list the frames once in a Parquet manifest"
            )
        return tree.entries, tree.misplaced
    entries, misplaced = [], []
    for info in list_files(loc):
        parts = tuple(posixpath.relpath(info.path, loc.path).split("/"))
        if len(parts) == 3:
            entries.append((parts, info.path))
        else:
            misplaced.append("/".join(parts))
    return entries, misplaced


def _discover_directory(loc: Location, extensions: tuple[str, ...]) -> InputIndex:
    """Every entry ``<episode>/<track>/<frame>.<ext>``: regular files, and special files and
    broken links too (the decode stage lists those in the errors table without reading them)."""
    try:
        entries, misplaced = _directory_candidates(loc)
    except (InputRefused, OSError) as exc:
        raise InputError(f"input {loc.uri}: {exc}") from None
    rows: dict[str, list] = {"episode_id": [], "track_id": [], "frame": [], "path": []}
    exts = {e.lower().lstrip(".") for e in extensions}
    unsafe = []
    for (episode, track, file_name), path in entries:
        name, _, ext = file_name.rpartition(".")
        if ext.lower() not in exts or not name or file_name.startswith("."):
            misplaced.append(f"{episode}/{track}/{file_name}")
            continue
        if not all(is_safe_id(part) for part in (episode, track, name)):
            unsafe.append(show_path(f"{episode}/{track}/{file_name}"))
            continue
        for key, value in zip(rows, (episode, track, name, path), strict=True):
            rows[key].append(value)
    if unsafe:
        raise InputError(_unsafe_message(loc.uri, f"{len(unsafe)} file(s) named with ids", unsafe[:5]))
    if misplaced:
        logger.warning(
            "%d entries under %s are not <episode>/<track>/<frame>.{%s} and are ignored, e.g. %s",
            len(misplaced), loc.uri, ",".join(sorted(exts)), [show_path(m) for m in misplaced[:3]],
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


def _base_type(t: pa.DataType) -> pa.DataType:
    return t.value_type if pa.types.is_dictionary(t) else t


def _is_text(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t)


def _is_landmark_list(t: pa.DataType) -> bool:
    while pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t):
        t = t.value_type
        if pa.types.is_integer(t) or pa.types.is_floating(t):
            return True
    return False


# column -> (accepted type, what to write instead): checked in every file, before any work
_COLUMN_TYPES = {
    "episode_id": (lambda t: _is_text(t) or pa.types.is_integer(t), "a string or integer column"),
    "track_id": (lambda t: _is_text(t) or pa.types.is_integer(t), "a string or integer column"),
    "frame": (lambda t: _is_text(t) or pa.types.is_integer(t), "a string or integer column"),
    "image": (lambda t: pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_binary_view(t),
              "a binary column of encoded image bytes (pa.binary()), or file paths in a 'path' column"),
    "path": (_is_text, "a string column of paths"),
    "kps": (_is_landmark_list, "a list column of 10 numbers (5 x, y landmarks) per row"),
}


def _check_types(schema: pa.Schema, where: str) -> None:
    for name, (accepts, expected) in _COLUMN_TYPES.items():
        if name in schema.names:
            t = schema.field(name).type
            if not (pa.types.is_null(t) or accepts(_base_type(t))):
                raise InputError(f"manifest {where}: column {name!r} is {t}; expected {expected}")


def _check_ids(table: pa.Table, where: str) -> None:
    examples: list[str] = []
    for col in ID_COLUMNS:
        ok = pc.match_substring_regex(table[col], f"^{SAFE_ID.pattern}$")
        examples += unsafe_ids(table[col].filter(pc.invert(ok)).to_pylist(), 5 - len(examples))
        if len(examples) == 5:
            break
    if examples:
        raise InputError(_unsafe_message(f"manifest {where}", "ids", [repr(e) for e in examples]))


def _unify(schemas: list[pa.Schema], where: str) -> pa.Schema:
    """One schema for the pass-through columns of every file: a column some files lack is null
    in their rows; one whose types cannot be unified is refused."""
    try:
        return pa.unify_schemas(schemas, promote_options="permissive") if schemas else pa.schema([])
    except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
        raise InputError(f"manifest {where}: the files disagree on a column's type: {str(exc)[:300]}"
                         ) from None


def _read_manifest(files: list[str], loc: Location) -> tuple[pa.Table, bool, pa.Schema]:
    """The index columns of every manifest file (ids as strings: integers in decimal), after
    checking each file's columns and types; whether any file has inline images; and the
    pass-through columns' schema."""
    tables, inline, extra = [], False, []
    for f in files:
        schema = pq.read_schema(f, filesystem=loc.fs)
        names = set(schema.names)
        missing = [c for c in ID_COLUMNS if c not in names]
        if missing:
            raise InputError(f"manifest {f} lacks column(s) {missing}; it has {sorted(names)}")
        if "image" not in names and "path" not in names:
            raise InputError(f"manifest {f} needs an 'image' (bytes) or a 'path' column")
        _check_types(schema, f)
        try:
            extra.append(pass_through_schema(schema))
        except ColumnClash as exc:
            raise InputError(f"manifest {f}: {exc}") from None
        inline = inline or "image" in names
        t = pq.read_table(f, columns=[*ID_COLUMNS, *(c for c in ("path", "kps") if c in names)],
                          filesystem=loc.fs)
        for col in (*ID_COLUMNS, "path"):
            if col in names:
                t = t.set_column(t.schema.get_field_index(col), col, pc.cast(t[col], pa.string()))
        tables.append(t)
    return pa.concat_tables(tables, promote_options="permissive"), inline, _unify(extra, loc.uri)


def _discover_manifest(loc: Location) -> InputIndex:
    files = _manifest_files(loc)
    if not files:
        raise InputError(f"no .parquet manifest files under {loc.uri}")
    try:
        table, inline, extra = _read_manifest(files, loc)
    except (OSError, pa.ArrowInvalid) as exc:
        raise InputError(f"manifest {loc.uri} cannot be read: {str(exc)[:300]}") from None
    if table.num_rows == 0:
        raise InputError(f"manifest {loc.uri} has no rows: nothing to embed")
    for col in ID_COLUMNS:
        if table[col].null_count:
            raise InputError(f"manifest {loc.uri}: column {col!r} has {table[col].null_count} null value(s)")
    _check_ids(table, loc.uri)
    table = table.add_column(0, "uid", make_uid(table["episode_id"], table["track_id"], table["frame"]))
    _check_unique(table, loc.uri)
    return InputIndex("manifest", loc, table, has_inline_images=inline, manifest_files=tuple(files),
                      pass_through=extra)


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
