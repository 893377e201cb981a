"""The job's own column names, and the manifest columns it carries through untouched.

A manifest can hold whatever its upstream detector wrote (timestamps, boxes, scores, shot
ids). The job *consumes* ``CONSUMED``: the ids (they become the partition and the keys),
``image``, ``path`` (read; its value is the output's ``source``) and ``kps`` (used to align).
Every other column is a *pass-through* column: it reaches the output rows (embeddings and
errors tables, and the Lance store's faces table) unchanged, Arrow type included, so vectors
join back to the video. A pass-through column named like one of the job's own columns
(``RESERVED``) would be overwritten or would make a row ambiguous: ``pass_through_schema``
refuses it before any work.
"""

from __future__ import annotations

import pyarrow as pa

from .ids import ID_COLUMNS

CONSUMED = (*ID_COLUMNS, "image", "path", "kps")
ENGINE_COLUMNS = ("model_id", "model_sha256", "backend", "precision", "contract")
# embeddings/episode_id=E/part-0.parquet, before the pass-through columns
ROW_COLUMNS = ("track_id", "frame", "embedding", "norm", "in_template", *ENGINE_COLUMNS, "source")
# errors/episode_id=E/part-0.parquet, before the pass-through columns
ERROR_COLUMNS = ("track_id", "frame", "source", "reason", "error")
TEMPLATE_COLUMNS = ("track_id", "template", "frame_count", "crops_used", "mean_norm", "contract")
# Between stages only: the row key and the decoded crop.
INTERNAL_COLUMNS = ("uid", "crop")
# Lance adds these to query results (and reserves _rowid / _rowaddr in every table).
LANCE_COLUMNS = ("_rowid", "_rowaddr", "_distance", "_score", "_relevance_score")
RESERVED = frozenset(
    ("episode_id", *ROW_COLUMNS, *ERROR_COLUMNS, *TEMPLATE_COLUMNS, *INTERNAL_COLUMNS, *LANCE_COLUMNS)
)


class ColumnClash(ValueError):
    """Pass-through columns named like the job's own; ``names`` lists them."""

    def __init__(self, names: list[str]) -> None:
        super().__init__(
            f"column(s) {names} would be overwritten by the job's own output columns "
            f"({sorted(RESERVED - set(LANCE_COLUMNS))} and Lance's {list(LANCE_COLUMNS)}); rename them "
            "in the manifest (every other column is carried to the output unchanged)"
        )
        self.names = names


def pass_through_schema(schema: pa.Schema) -> pa.Schema:
    """The pass-through fields of a manifest ``schema``, in its order; ``ColumnClash`` on a clash."""
    extra = [f for f in schema if f.name not in CONSUMED]
    clash = sorted(f.name for f in extra if f.name in RESERVED)
    if clash:
        raise ColumnClash(clash)
    return pa.schema(extra)
