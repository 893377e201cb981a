"""Screen time: how long each identity (or unknown cluster) is on screen in each episode.

Input: the face rows of an episode's output (``episode_id, track_id, frame`` and, when the
manifest had one, ``timestamp``) and each track's assignment (``episode_id, track_id,
identity``). A face row is an *instant* at which its track's identity is visible: the
``timestamp`` when the rows carry one, else the frame number (``frame`` must then be an
integer such as ``00012``) over ``fps``. Two tracks of one identity in the same instant (a
duplicate detection) count once. Then, per ``(episode_id, identity)``:

- ``seconds``: distinct instants x ``1 / fps`` (``fps`` is the rate faces were sampled at:
  detections every 5th frame of 25 fps video is 5);
- ``frames``: distinct instants; ``tracks``: tracks assigned;
- ``first_seen_s`` / ``last_seen_s``: the first and last instant, in seconds from the
  episode's first face row (timestamps) or from frame 0 (frames);
- ``time_source``: ``timestamp`` or ``frames``.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

SCREEN_TIME_SCHEMA = pa.schema([
    ("episode_id", pa.string()), ("identity", pa.string()), ("seconds", pa.float64()),
    ("frames", pa.int64()), ("tracks", pa.int64()), ("first_seen_s", pa.float64()),
    ("last_seen_s", pa.float64()), ("time_source", pa.string()),
])


def _instants(rows: pa.Table, fps: float) -> tuple[pa.Array, float, str]:
    """Each row's instant as int64 and the seconds one unit of it is (timestamps: ns)."""
    if "timestamp" in rows.column_names and rows.num_rows and rows["timestamp"].null_count == 0 \
            and pa.types.is_timestamp(rows.schema.field("timestamp").type):
        return pc.cast(pc.cast(rows["timestamp"], pa.timestamp("ns")), pa.int64()), 1e-9, "timestamp"
    frames = rows["frame"].to_pylist()
    try:
        numbers = np.asarray([int(f) for f in frames], np.int64)
    except (TypeError, ValueError):
        bad = next(f for f in frames if not str(f).strip().lstrip("-").isdigit())
        raise ValueError(f"screen time needs a timestamp column or integer frame ids; frame {bad!r} is "
                         "neither (name frames 00000, 00001, ... or add a timestamp column to the manifest)"
                         ) from None
    return pa.array(numbers), 1.0 / fps, "frames"


def screen_time(rows: pa.Table, assignments: pa.Table, fps: float) -> pa.Table:
    """The screen-time table (``SCREEN_TIME_SCHEMA``) of ``rows`` (one or many episodes) given the
    track ``assignments``; rows of tracks without an assignment are left out."""
    if not fps > 0:
        raise ValueError(f"fps must be > 0, got {fps}")
    if rows.num_rows == 0:
        return SCREEN_TIME_SCHEMA.empty_table()
    instants, unit, source = _instants(rows, fps)
    faces = pa.table({"episode_id": rows["episode_id"], "track_id": rows["track_id"], "instant": instants})
    starts = faces.group_by("episode_id").aggregate([("instant", "min")]).rename_columns(
        ["episode_id", "start"])
    if source == "frames":
        starts = starts.set_column(1, "start", pa.array(np.zeros(starts.num_rows, np.int64)))
    keyed = faces.join(assignments.select(["episode_id", "track_id", "identity"]),
                       ["episode_id", "track_id"], join_type="inner")
    if keyed.num_rows == 0:
        return SCREEN_TIME_SCHEMA.empty_table()
    distinct = keyed.group_by(["episode_id", "identity", "instant"]).aggregate([])
    per = distinct.group_by(["episode_id", "identity"]).aggregate(
        [("instant", "count"), ("instant", "min"), ("instant", "max")])
    tracks = keyed.group_by(["episode_id", "identity"]).aggregate([("track_id", "count_distinct")])
    per = per.join(tracks, ["episode_id", "identity"]).join(starts, "episode_id")
    per = per.sort_by([("episode_id", "ascending"), ("instant_count", "descending"),
                       ("identity", "ascending")])
    count = per["instant_count"].to_numpy().astype(np.int64)
    start = per["start"].to_numpy().astype(np.float64)
    return pa.table({
        "episode_id": per["episode_id"],
        "identity": per["identity"],
        "seconds": pa.array(count / fps, pa.float64()),
        "frames": pa.array(count, pa.int64()),
        "tracks": pa.array(per["track_id_count_distinct"].to_numpy(), pa.int64()),
        "first_seen_s": pa.array((per["instant_min"].to_numpy() - start) * unit, pa.float64()),
        "last_seen_s": pa.array((per["instant_max"].to_numpy() - start) * unit, pa.float64()),
        "time_source": pa.array([source] * per.num_rows, pa.string()),
    }, schema=SCREEN_TIME_SCHEMA)
