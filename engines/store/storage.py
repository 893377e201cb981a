"""Local paths and ``s3://`` URIs behind one pyarrow filesystem interface.

The job reads inputs and writes outputs through ``pyarrow.fs`` so the same code
runs on a laptop directory and on S3 (or MinIO, or moto's server in tests, via
``storage.endpoint_url``). Writes that must never be seen half-done go through
``write_atomic``: a temporary name, then a rename (a single PUT on S3, which is
atomic per object).
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import uuid
from dataclasses import dataclass
from urllib.parse import urlparse

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from ..errors import ConfigError

# ``write_atomic``'s temporary names: a crash between write and rename leaves one behind,
# and only names of exactly this form are ever cleaned up as this job's own.
TMP_NAME = re.compile(r"\.[0-9a-f]{32}\.tmp")


@dataclass(frozen=True)
class Location:
    """A filesystem plus a path inside it (no scheme), and the URI it came from."""

    fs: pafs.FileSystem
    path: str
    uri: str

    def join(self, *parts: str) -> Location:
        path = "/".join([self.path.rstrip("/"), *[p.strip("/") for p in parts]])
        uri = "/".join([self.uri.rstrip("/"), *[p.strip("/") for p in parts]])
        return Location(self.fs, path, uri)

    @property
    def is_s3(self) -> bool:
        return isinstance(self.fs, pafs.S3FileSystem)


def s3_filesystem(endpoint_url: str | None = None, region: str | None = None) -> pafs.S3FileSystem:
    kwargs: dict = {"region": region or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"}
    if endpoint_url:
        parsed = urlparse(endpoint_url)
        kwargs["endpoint_override"] = parsed.netloc or parsed.path
        kwargs["scheme"] = parsed.scheme or "https"
    return pafs.S3FileSystem(**kwargs)


def locate(uri: str, endpoint_url: str | None = None, region: str | None = None) -> Location:
    """``s3://bucket/prefix`` or a local path -> ``Location`` (local paths made absolute)."""
    if uri.startswith("s3://"):
        return Location(s3_filesystem(endpoint_url, region), uri[len("s3://") :].rstrip("/"), uri.rstrip("/"))
    path = os.path.abspath(os.path.expanduser(uri))
    return Location(pafs.LocalFileSystem(), path, path)


def exists(loc: Location) -> bool:
    return loc.fs.get_file_info(loc.path).type != pafs.FileType.NotFound


def is_dir(loc: Location) -> bool:
    return loc.fs.get_file_info(loc.path).type == pafs.FileType.Directory


def list_files(loc: Location, recursive: bool = True) -> list[pafs.FileInfo]:
    if not exists(loc):
        return []
    infos = loc.fs.get_file_info(pafs.FileSelector(loc.path, recursive=recursive, allow_not_found=True))
    return [i for i in infos if i.type == pafs.FileType.File]


def read_bytes(fs: pafs.FileSystem, path: str) -> bytes:
    with fs.open_input_stream(path) as fh:
        return fh.read()


def write_atomic(fs: pafs.FileSystem, path: str, data: bytes) -> None:
    parent = path.rsplit("/", 1)[0]
    if isinstance(fs, pafs.LocalFileSystem):
        tmp = f"{parent}/.{uuid.uuid4().hex}.tmp"  # matches TMP_NAME
        with _open_in_new_dir(fs, parent, tmp) as fh:
            fh.write(data)
        fs.move(tmp, path)
    else:  # one PUT: the object appears whole or not at all
        fs.create_dir(parent, recursive=True)
        with fs.open_output_stream(path) as fh:
            fh.write(data)


def _open_in_new_dir(fs: pafs.FileSystem, parent: str, path: str, attempts: int = 5) -> pa.NativeFile:
    """``path`` opened for writing, its directories made first. A directory another process
    found empty and removed (``remove_dir_if_empty``) between the two steps is made again."""
    for _ in range(attempts - 1):
        with contextlib.suppress(FileNotFoundError):
            fs.create_dir(parent, recursive=True)
            return fs.open_output_stream(path)
    fs.create_dir(parent, recursive=True)
    return fs.open_output_stream(path)


def write_parquet_atomic(fs: pafs.FileSystem, path: str, table: pa.Table) -> None:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    write_atomic(fs, path, sink.getvalue().to_pybytes())


def delete_files(fs: pafs.FileSystem, paths: list[str]) -> None:
    """Delete exactly ``paths`` (files); ones already gone are fine."""
    for path in paths:
        with contextlib.suppress(FileNotFoundError):
            fs.delete_file(path)


def remove_dir_if_empty(loc: Location) -> None:
    """Remove the directory ``loc`` only if nothing is left in it: a file this job did not
    write (someone's notes, another tool's output) keeps it, and is never deleted.

    On a local disk this is one ``rmdir``, which refuses a non-empty directory by itself: a
    check followed by ``delete_dir`` (recursive) would delete a file written in between, and
    two callers removing the same directory would fail the second. An object store has no
    directories to race on, only a marker object, so it keeps the check."""
    if isinstance(loc.fs, pafs.LocalFileSystem):
        try:
            os.rmdir(loc.path)
        except (FileNotFoundError, NotADirectoryError):
            pass
        except OSError as exc:
            if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
        return
    info = loc.fs.get_file_info(loc.path)
    if info.type != pafs.FileType.Directory:
        return
    if not loc.fs.get_file_info(pafs.FileSelector(loc.path, recursive=False, allow_not_found=True)):
        with contextlib.suppress(FileNotFoundError):
            loc.fs.delete_dir(loc.path)


def orphan_tmp_files(loc: Location) -> list[str]:
    """Temporary files ``write_atomic`` left directly in ``loc`` (a crash between write and rename)."""
    return [i.path for i in list_files(loc, recursive=False) if TMP_NAME.fullmatch(i.base_name)]


def check_output_dir(loc: Location, probe: bool) -> None:
    """Refuse an output that cannot hold the job's files, before any work: one that exists and
    is not a directory, and (``probe``: the run will write) one where a small file cannot be
    written (read-only, permissions, a missing bucket), by writing and removing one."""
    try:
        kind = loc.fs.get_file_info(loc.path).type
    except OSError as exc:
        raise ConfigError(f"output {loc.uri} cannot be reached: {str(exc)[:300]}") from None
    if kind not in (pafs.FileType.NotFound, pafs.FileType.Directory):
        raise ConfigError(f"output {loc.uri} exists and is not a directory; --output names a directory "
                          "the job creates or resumes")
    if not probe:
        return
    path = loc.join(f".{uuid.uuid4().hex}.tmp").path  # TMP_NAME: cleaned like any crashed write
    try:
        write_atomic(loc.fs, path, b"")
        loc.fs.delete_file(path)
    except OSError as exc:
        reason = exc.strerror or str(exc)[:300]
        raise ConfigError(f"output {loc.uri} is not writable ({reason}); nothing was run") from None
