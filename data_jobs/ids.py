"""The safe alphabet of the ids that become paths and keys: ``episode_id``, ``track_id``, ``frame``.

An episode id is a directory name twice over (``_staging/<episode>/`` and
``embeddings/episode_id=<episode>/``), and the three ids joined by ``/`` are the row's
``uid``, which resume and commit compare. An id is therefore **1 to 128 characters from
``A-Z a-z 0-9 . _ -``, starting with a letter, a digit or ``_``**. That rules out, before
any work starts:

- ``..``, ``/``, ``\\`` and absolute paths, which would stage (and then clean up) outside
  the output;
- the empty id (``_staging/`` itself: its cleanup would take every episode's staging);
- ``/`` inside an id, so ``(a/b, c, d)`` and ``(a, b/c, d)`` cannot share a uid, and
  ``a`` and ``a/b`` cannot read back as one episode;
- ``=`` and ``%``, which Hive-partitioned readers parse (``episode_id=a=b``) or
  URL-decode, hidden names (a leading ``.``) and names a shell takes for an option
  (a leading ``-``);
- anything a file system or an object store spells differently (non-ASCII and non-UTF-8
  names, spaces, control characters).

The check is also applied where paths are built (``episode_dir``), so no caller can
skip it. Integer ids (a manifest's ``frame`` column, say) are written in decimal and
pass as long as they are not negative.
"""

from __future__ import annotations

import re

SAFE_ID = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")
SAFE_ID_RULE = "1-128 characters from A-Z a-z 0-9 . _ -, starting with a letter, a digit or _"
ID_COLUMNS = ("episode_id", "track_id", "frame")


def is_safe_id(value: object) -> bool:
    return isinstance(value, str) and SAFE_ID.fullmatch(value) is not None


def unsafe_ids(values: list[str], limit: int = 5) -> list[str]:
    """Up to ``limit`` distinct values of ``values`` outside the safe alphabet."""
    bad: list[str] = []
    for value in dict.fromkeys(values):
        if not is_safe_id(value):
            bad.append(value)
            if len(bad) == limit:
                break
    return bad


def require_safe_id(value: str, what: str = "episode_id") -> str:
    """``value`` if it is safe; a ``ValueError`` otherwise (the last guard before a path)."""
    if not is_safe_id(value):
        raise ValueError(f"{what} {value!r} is not a safe path component ({SAFE_ID_RULE})")
    return value
