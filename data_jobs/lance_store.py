"""The episode job's optional Lance sink: ``faces``, ``tracks`` and ``episodes`` tables.

    faces     one row per embedded face: episode_id, the embeddings table's columns and
              every pass-through column (so a hit joins back to the video)
    tracks    one row per track with a template: episode_id, the templates table's columns;
              a cosine ANN index on ``template`` is (re)built when a job ends
    episodes  one row per episode in the store (episode_id, rows, tracks, contract,
              committed_at): the store's own record of what it holds

The store is a projection of the committed Parquet output, which stays the source of
truth. An episode's commit task writes its Lance fragments from the rows it just
committed (on the cluster: vectors never reach the driver), and the driver's
``StoreCommitter`` appends the fragments of the episodes committed in the last
``lance_commit_interval_s`` seconds, in that order: faces, tracks, then their
``episodes`` rows, which are the commit record. Exactly once, also after a crash: the
committer first writes ``_pending.json`` naming the episodes it appends and removes it
after their ``episodes`` rows; a run that finds one deletes those episodes' faces and
tracks rows that have no ``episodes`` row (an append cut short) and appends them again.
Every committed episode of the input missing from ``episodes`` (the driver died before
appending it, or the output predates the store) is backfilled from its Parquet files at
the job's end, by tasks on the cluster.
"""

from __future__ import annotations

import json
import logging
import pickle
import time
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc

from engines import ConfigError, VectorStore, delete_files, exists, locate, read_bytes, write_atomic

from .columns import ENGINE_COLUMNS
from .partitions import partition

logger = logging.getLogger(__name__)

FACES, TRACKS, EPISODES = "faces", "tracks", "episodes"
PENDING = "_pending.json"
EPISODES_SCHEMA = pa.schema(
    [
        ("episode_id", pa.string()),
        ("rows", pa.int64()),
        ("tracks", pa.int64()),
        ("contract", pa.string()),
        ("committed_at", pa.string()),
    ]
)


def faces_schema(pass_through: pa.Schema, dim: int) -> pa.Schema:
    fields = [
        pa.field("episode_id", pa.string()),
        pa.field("track_id", pa.string()),
        pa.field("frame", pa.string()),
        pa.field("embedding", pa.list_(pa.float32(), dim)),
        pa.field("norm", pa.float32()),
        pa.field("in_template", pa.bool_()),
        *(pa.field(c, pa.string()) for c in (*ENGINE_COLUMNS, "source")),
    ]
    return pa.schema([*fields, *pass_through])


def tracks_schema(dim: int) -> pa.Schema:
    return pa.schema(
        [
            ("episode_id", pa.string()),
            ("track_id", pa.string()),
            ("template", pa.list_(pa.float32(), dim)),
            ("frame_count", pa.int64()),
            ("crops_used", pa.int64()),
            ("mean_norm", pa.float32()),
            ("contract", pa.string()),
        ]
    )


@dataclass(frozen=True)
class StoreTarget:
    """What a commit task needs to write an episode's fragments (strings and schemas only)."""

    store: VectorStore
    faces: pa.Schema
    tracks: pa.Schema = field(default_factory=lambda: tracks_schema(512))


def _conform(table: pa.Table, schema: pa.Schema, episode: str) -> pa.Table:
    """``table`` with an ``episode_id`` column, in ``schema``'s order and types (a column the
    store has and this input lacks is null)."""
    columns = []
    for f in schema:
        if f.name == "episode_id":
            columns.append(pa.array([episode] * table.num_rows, pa.string()))
        elif f.name in table.column_names:
            values = table[f.name]
            columns.append(values.cast(f.type) if values.type != f.type else values)
        else:
            columns.append(pa.nulls(table.num_rows, f.type))
    return pa.Table.from_arrays(columns, schema=schema)


def episode_fragments(target: StoreTarget, episode: str, rows: pa.Table, templates: pa.Table | None) -> bytes:
    """Write one episode's faces and tracks fragments (where this runs); pickled metadata back."""
    store = target.store
    tracks = templates.filter(pc.is_valid(templates["template"])) if templates is not None else None
    frags = {
        FACES: store.write_fragments(FACES, _conform(rows, store.stamped(target.faces), episode))
        if rows.num_rows
        else [],
        TRACKS: store.write_fragments(TRACKS, _conform(tracks, store.stamped(target.tracks), episode))
        if tracks is not None and tracks.num_rows
        else [],
    }
    return pickle.dumps((frags, rows.num_rows, tracks.num_rows if tracks is not None else 0))


def backfill_fragments(output, target: StoreTarget, episode: str) -> bytes:
    """``episode_fragments`` from the episode's committed Parquet files (a Ray task's body)."""
    import pyarrow.parquet as pq

    rows = pq.read_table(
        partition(output, "embeddings", episode).join("part-0.parquet").path, filesystem=output.fs
    )
    tpl = partition(output, "templates", episode).join("part-0.parquet")
    templates = pq.read_table(tpl.path, filesystem=output.fs) if exists(tpl) else None
    return episode_fragments(target, episode, rows, templates)


class StoreCommitter:
    """The driver's side of the store: recovery, batched appends, backfill, the index. It handles
    fragment metadata and per-episode counts only."""

    def __init__(self, target: StoreTarget, model_id: str, interval_s: float) -> None:
        self.target, self.store, self.interval_s = target, target.store, interval_s
        self.store.open(model_id, target.tracks.field("template").type.list_size)
        self._check_schema()
        for name, schema in ((FACES, target.faces), (TRACKS, target.tracks), (EPISODES, EPISODES_SCHEMA)):
            self.store.create(name, schema)
        self._batch: list[tuple[str, dict[str, list], int, int]] = []
        self._last = time.monotonic()
        self.appended: list[str] = []
        self._recover()

    def _check_schema(self) -> None:
        """This input's faces columns must fit the store's faces table (same names, same types;
        the store may have more: they are null for this input's rows)."""
        ds = self.store.dataset(FACES)
        if ds is None:
            return
        theirs = {f.name: f.type for f in ds.schema}
        odd = [f"{f.name} ({f.type})" for f in self.target.faces if theirs.get(f.name) != f.type]
        if odd:
            raise ConfigError(
                f"vector store {self.store.uri}: its faces table has no column(s) {odd} of "
                f"this input (it has {sorted(theirs)}); use another store for this input"
            )
        self.target = StoreTarget(self.store, pa.schema([f for f in ds.schema]), self.target.tracks)

    def _pending(self):
        return locate(self.store.uri, self.store.endpoint_url, self.store.region).join(PENDING)

    def stored_episodes(self) -> set[str]:
        ds = self.store.dataset(EPISODES)
        return set(ds.to_table(columns=["episode_id"])["episode_id"].to_pylist()) if ds is not None else set()

    def _recover(self) -> None:
        marker = self._pending()
        if not exists(marker):
            return
        cut = set(json.loads(read_bytes(marker.fs, marker.path))["episodes"]) - self.stored_episodes()
        if cut:
            logger.warning(
                "vector store %s: an append of %d episode(s) was cut short; removing their rows",
                self.store.uri,
                len(cut),
            )
            predicate = "episode_id IN (" + ", ".join(f"'{e}'" for e in sorted(cut)) + ")"  # safe ids only
            for name in (FACES, TRACKS):
                self.store.dataset(name).delete(predicate)
        delete_files(marker.fs, [marker.path])

    def add(self, episode: str, fragments: bytes) -> None:
        frags, rows, tracks = pickle.loads(fragments)
        self._batch.append((episode, frags, rows, tracks))

    def maybe_flush(self) -> None:
        if self._batch and time.monotonic() - self._last >= self.interval_s:
            self.flush()

    def flush(self) -> None:
        """Append the batch: ``_pending.json``, faces, tracks, ``episodes`` rows, marker removed."""
        self._last = time.monotonic()
        if not self._batch:
            return
        batch, self._batch = self._batch, []
        episodes = [b[0] for b in batch]
        marker = self._pending()
        write_atomic(marker.fs, marker.path, json.dumps({"episodes": episodes}).encode())
        for name in (FACES, TRACKS):
            self.store.append(name, [f for _, frags, _, _ in batch for f in frags[name]])
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        self.store.append_table(
            EPISODES,
            pa.table(
                {
                    "episode_id": episodes,
                    "rows": [b[2] for b in batch],
                    "tracks": [b[3] for b in batch],
                    "contract": [self.store.contract] * len(batch),
                    "committed_at": [now] * len(batch),
                },
                schema=self.store.stamped(EPISODES_SCHEMA),
            ),
        )
        delete_files(marker.fs, [marker.path])
        self.appended += episodes
        logger.info("vector store %s: appended %d episode(s)", self.store.uri, len(episodes))

    def backfill(self, output, committed: list[str], num_cpus: float) -> list[str]:
        """Append every episode of ``committed`` the store does not hold, from its Parquet files."""
        import ray

        missing = sorted(set(committed) - self.stored_episodes() - {b[0] for b in self._batch})
        if missing:
            logger.info("vector store %s: backfilling %d committed episode(s)", self.store.uri, len(missing))
            task = ray.remote(backfill_fragments).options(num_cpus=num_cpus)
            refs = {task.remote(output, self.target, ep): ep for ep in missing}
            for ref, ep in refs.items():
                self.add(ep, ray.get(ref))
        self.flush()
        return missing

    def build_index(self, index_type: str, partitions: int) -> int:
        return self.store.build_index(TRACKS, "template", index_type, partitions)


def target_for(
    uri: str, contract: str, pass_through: pa.Schema, dim: int, endpoint_url: str | None, region: str | None
) -> StoreTarget:
    return StoreTarget(
        VectorStore(uri, contract, endpoint_url, region), faces_schema(pass_through, dim), tracks_schema(dim)
    )
