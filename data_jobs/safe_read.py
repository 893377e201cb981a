"""Reading files the job did not make: a local walk that sees every entry, and bounded reads.

An input tree or a manifest can point at anything: a FIFO (``open`` blocks until a writer
comes, forever), a character device (``/dev/zero`` never ends), a broken symbolic link,
a multi-GB file, an object store endpoint that accepts a connection and then trickles a
byte a second. None of these may hang a decode task or fill its memory, and each must
end up in the errors table under its name:

- ``walk_local`` lists a local tree itself (``os.scandir``, not pyarrow, which drops
  broken links silently and raises on a non-UTF-8 name without naming it), down to a
  fixed depth, and reports every directory reached twice (a symbolic link to another
  episode would embed the same frames under two ids);
- ``read_limited`` reads one file under a byte limit (and, from an object store, a
  wall-clock limit: the S3 client's own timeouts let a trickling endpoint through), raising
  ``InputRefused`` with a reason: ``not_a_file`` (FIFO, socket, device, directory,
  broken link: never opened), ``file_too_large`` (size checked before reading, and never
  more than the limit read), ``read_timeout``, ``unreadable`` (missing, permission, I/O
  or store errors).
"""

from __future__ import annotations

import os
import queue
import stat
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

import pyarrow.fs as pafs

T = TypeVar("T")
_CHUNK = 1 << 20


class InputRefused(ValueError):
    """A row that is not read or not decoded: ``reason`` tags it in the errors table."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def show_path(path: str) -> str:
    """``path`` printable: bytes that are not UTF-8 (kept by ``os.scandir`` as surrogates) as ``\\xNN``."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


@dataclass
class LocalTree:
    """What ``walk_local`` saw: ``entries`` are (parts relative to the root, absolute path) of every
    non-directory at depth ``depth`` (regular files, special files and broken links alike),
    ``misplaced`` every other non-directory and every directory at that depth, ``aliases``
    (directory, earlier directory) pairs naming the same real directory."""

    entries: list[tuple[tuple[str, ...], str]] = field(default_factory=list)
    misplaced: list[str] = field(default_factory=list)
    aliases: list[tuple[str, str]] = field(default_factory=list)


def _is_dir(entry: os.DirEntry) -> bool:
    """``entry.is_dir()``, False where the entry cannot be resolved (a symbolic-link loop raises
    ELOOP): such an entry is indexed as a file, and reading it makes one error row, not a refused
    job."""
    try:
        return entry.is_dir()
    except OSError:
        return False


def walk_local(root: str, depth: int) -> LocalTree:
    """Walk ``root`` breadth-first in name order, descending ``depth - 1`` directory levels,
    following symbolic links to directories once each (``aliases`` lists the rest)."""
    tree = LocalTree()
    seen = {os.path.realpath(root): root}
    level = [(root, ())]
    for d in range(1, depth + 1):
        below: list[tuple[str, tuple[str, ...]]] = []
        for directory, parts in level:
            try:
                with os.scandir(directory) as it:
                    children = sorted(it, key=lambda e: e.name)
            except OSError as exc:
                where = show_path(directory)
                raise InputRefused("unreadable", f"cannot list {where}: {exc.strerror}") from None
            for entry in children:
                rel = (*parts, entry.name)
                if not _is_dir(entry):  # follows links; False for broken links and special files
                    if d == depth:
                        tree.entries.append((rel, entry.path))
                    else:
                        tree.misplaced.append("/".join(rel))
                elif d == depth:
                    tree.misplaced.append("/".join(rel) + "/")
                else:
                    real = os.path.realpath(entry.path)
                    if real in seen:
                        tree.aliases.append((entry.path, seen[real]))
                    else:
                        seen[real] = entry.path
                        below.append((entry.path, rel))
        level = below
    return tree


def _describe(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "FIFO"), (stat.S_ISSOCK, "socket"), (stat.S_ISCHR, "character device"),
                       (stat.S_ISBLK, "block device"), (stat.S_ISDIR, "directory")):
        if test(mode):
            return name
    return "special file"


def _too_large(path: str, size: str, max_bytes: int) -> InputRefused:
    return InputRefused("file_too_large", f"{show_path(path)} is {size} bytes; at most {max_bytes:,} "
                                          "are read (episodes.max_file_mb)")


def _read_local(path: str, max_bytes: int) -> bytes:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        if os.path.islink(path):
            raise InputRefused("not_a_file", f"{show_path(path)} is a broken symbolic link "
                                             f"(to {show_path(os.readlink(path))})") from None
        raise InputRefused("unreadable", f"cannot read {show_path(path)}: no such file") from None
    except OSError as exc:
        raise InputRefused("unreadable", f"cannot read {show_path(path)}: {exc.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise InputRefused("not_a_file", f"{show_path(path)} is a {_describe(st.st_mode)}, "
                                         "not a regular file: not read")
    if st.st_size > max_bytes:
        raise _too_large(path, f"{st.st_size:,}", max_bytes)
    try:
        # O_NONBLOCK: had the file been swapped for a FIFO since the stat, open must not wait for a writer
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise InputRefused("unreadable", f"cannot read {show_path(path)}: {exc.strerror}") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise InputRefused("not_a_file", f"{show_path(path)} is no longer a regular file: not read")
        chunks, total = [], 0
        while chunk := os.read(fd, min(_CHUNK, max_bytes + 1 - total)):
            chunks.append(chunk)
            total += len(chunk)
            if total > max_bytes:  # grew since the stat
                raise _too_large(path, f"more than {max_bytes:,}", max_bytes)
        return b"".join(chunks)
    except OSError as exc:
        raise InputRefused("unreadable", f"cannot read {show_path(path)}: {exc.strerror}") from None
    finally:
        os.close(fd)


def _read_store(fs: pafs.FileSystem, path: str, max_bytes: int) -> bytes:
    try:
        with fs.open_input_file(path) as fh:  # one HEAD: the size before any byte is fetched
            size = fh.size()
            if size > max_bytes:
                raise _too_large(path, f"{size:,}", max_bytes)
            return fh.read(size)
    except OSError as exc:  # pyarrow's store and IO errors are OSErrors
        raise InputRefused("unreadable", f"cannot read {path}: {str(exc)[:300]}") from None


class _Worker:
    """One daemon thread that runs calls handed to it, one at a time. A call that overran its
    deadline keeps the thread (it cannot be interrupted): that worker is then retired and the
    next call gets a fresh one. Reused, a handoff costs tens of microseconds where starting a
    thread per read costs a millisecond."""

    def __init__(self) -> None:
        self._calls: queue.SimpleQueue = queue.SimpleQueue()
        threading.Thread(target=self._loop, name="arcface-read", daemon=True).start()

    def _loop(self) -> None:
        while True:
            fn, box, done = self._calls.get()
            try:
                box["value"] = fn()
            except BaseException as exc:  # re-raised in the caller's thread
                box["error"] = exc
            finally:
                done.set()

    def call(self, fn: Callable[[], T], timeout_s: float) -> tuple[bool, dict]:
        box: dict = {}
        done = threading.Event()
        self._calls.put((fn, box, done))
        return done.wait(timeout_s), box


_worker: _Worker | None = None
_worker_lock = threading.Lock()


def with_deadline(fn: Callable[[], T], timeout_s: float, what: str) -> T:
    """``fn()``, or ``InputRefused("read_timeout")`` after ``timeout_s`` seconds.

    The call runs in a daemon thread: a read blocked in the kernel or in the S3 client
    cannot be interrupted, so on timeout it is abandoned (it ends when its socket does)
    and the row moves on. ``timeout_s <= 0``: no limit, called inline."""
    global _worker
    if timeout_s <= 0:
        return fn()
    with _worker_lock:  # one call at a time per process: decode tasks are sequential
        worker = _worker = _worker or _Worker()
        finished, box = worker.call(fn, timeout_s)
        if not finished:
            _worker = None
    if not finished:
        raise InputRefused("read_timeout", f"reading {what} took more than {timeout_s:g} s "
                                           "(episodes.read_timeout_s): abandoned")
    if "error" in box:
        raise box["error"]
    return box["value"]


def read_limited(fs: pafs.FileSystem, path: str, max_bytes: int, timeout_s: float) -> bytes:
    """The bytes of the regular file ``path``: at most ``max_bytes``; from an object store,
    within ``timeout_s``. Local reads run inline: what could block them (FIFOs, devices) is
    never opened, and a thread handoff per file would cost a fifth of a small crop's decode."""
    if isinstance(fs, pafs.LocalFileSystem):
        return _read_local(path, max_bytes)
    return with_deadline(lambda: _read_store(fs, path, max_bytes), timeout_s, path)
