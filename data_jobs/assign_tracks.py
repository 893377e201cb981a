"""``arcface assign-tracks``: each track of an embedding job's output -> an identity, and the
screen time of every identity per episode (README "Gallery and identify").

Input: the committed episodes of an ``embed-episodes`` output (``reader.py``: their
``templates`` and the ``embeddings`` rows' ``track_id, frame[, timestamp]``) and a gallery
(``engines.identity``). The gallery must hold the output's embedding contract, else the run is
refused naming both. One Ray task per episode (Ray Data, ``batch_size=1``) assigns its tracks
(top-1 gallery identity at ``>= threshold``, else clusters of unknowns) and writes, under
``--output`` (default ``<embeddings>/assignments``)::

    identities/episode_id=<ep>/part-0.parquet    engines.identity.assign.IDENTITY_SCHEMA
    screen_time/episode_id=<ep>/part-0.parquet   engines.identity.screen_time.SCREEN_TIME_SCHEMA
    identities/episode_id=<ep>/_SUCCESS          JSON: the settings it was made with, counts

each file atomically (``write_atomic``), the ``_SUCCESS`` last. At the end the driver writes
``identities.parquet`` and ``screen_time.parquet`` at the output's root: every committed
episode's rows in one file each. Resuming: an episode whose ``_SUCCESS`` carries the same
settings (gallery location and version, threshold, cluster distance, fps, across) is
skipped; one made with other settings is redone. With ``--across-episodes`` unknown tracks
are clustered over all episodes at once in the driver (templates only: one vector per
track), and the set of episodes is part of the settings, so adding an episode redoes all.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from engines import (
    IDENTITY_SCHEMA,
    SCREEN_TIME_SCHEMA,
    AssignPolicy,
    ConfigError,
    Gallery,
    Location,
    VectorStore,
    assign_tracks,
    delete_files,
    exists,
    list_files,
    load_config,
    load_gallery,
    locate,
    read_bytes,
    screen_time,
    write_atomic,
    write_parquet_atomic,
)

from .commit import SUCCESS, read_success
from .partitions import partition
from .reader import committed_episodes

logger = logging.getLogger(__name__)

TEMPLATE_COLUMNS = ["track_id", "template", "frame_count"]


@dataclass(frozen=True)
class AssignSpec:
    embeddings: str
    gallery: str | None = None
    output: str | None = None
    threshold: float | None = None
    cluster_distance: float | None = None
    fps: float | None = None
    across: bool = False
    config: str | None = None
    concurrency: int = 2


def _read_partition(loc: Location, table: str, episode: str, columns: list[str] | None) -> pa.Table:
    part = partition(loc, table, episode)
    files = sorted(i.path for i in list_files(part, recursive=False)
                   if i.base_name.endswith(".parquet") and not i.base_name.startswith((".", "_")))
    tables = []
    for path in files:
        schema = pq.read_schema(path, filesystem=loc.fs)
        wanted = None if columns is None else [c for c in columns if c in schema.names]
        tables.append(pq.read_table(path, columns=wanted, filesystem=loc.fs))
    out = pa.concat_tables(tables) if tables else pa.table({"track_id": pa.array([], pa.string())})
    if "episode_id" not in out.column_names:
        out = out.append_column("episode_id", pa.array([episode] * out.num_rows, pa.string()))
    return out


def _episode_templates(loc: Location, episode: str) -> pa.Table:
    return _read_partition(loc, "templates", episode, TEMPLATE_COLUMNS)


UNIT_TOLERANCE = 1e-3  # the job writes templates L2-normalised (float32: within 1e-6)


def check_templates(table: pa.Table, episode: str, dim: int, contract: str) -> None:
    """Refuse, naming the episode and the column, a templates table the job could not have
    written: before any work, so a damaged output is one clear error, not a traceback from a
    Ray task or (scaled, foreign) vectors matched at a "cosine" far outside [-1, 1]."""
    where = f"templates of episode {episode}"
    missing = [c for c in ("track_id", "template") if c not in table.column_names]
    if missing:
        raise ConfigError(f"{where}: no column {missing[0]!r} (columns {table.column_names})")
    column = table["template"]
    if not (pa.types.is_list(column.type) or pa.types.is_fixed_size_list(column.type)) or \
            not pa.types.is_floating(column.type.value_type):
        raise ConfigError(f"{where}: column 'template' is {column.type}, not a list of floats")
    if "contract" in table.column_names:
        foreign = {c for c in table["contract"].to_pylist() if c is not None} - {contract}
        if foreign:
            raise ConfigError(f"{where}: column 'contract' holds {sorted(foreign)}, but the episode was "
                              f"committed as {contract}: vectors of different models are not comparable")
    valid = column.combine_chunks().drop_null() if table.num_rows else None
    if valid is None or len(valid) == 0:
        return
    lengths = pc.list_value_length(valid).to_numpy(zero_copy_only=False)
    if (lengths != dim).any():
        raise ConfigError(f"{where}: column 'template' holds vectors of {sorted(set(lengths.tolist()))} "
                          f"values; the contract's dimension is {dim}")
    vectors = valid.flatten().to_numpy(zero_copy_only=False).astype(np.float64).reshape(len(valid), dim)
    if not np.isfinite(vectors).all():
        raise ConfigError(f"{where}: column 'template' holds NaN or infinite values")
    off = float(np.abs(np.linalg.norm(vectors, axis=1) - 1.0).max())
    if off > UNIT_TOLERANCE:
        raise ConfigError(f"{where}: column 'template' holds vectors that are not unit length (one is "
                          f"{off:.3g} off 1), which the job never writes")


def _settings_key(settings: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def assign_episode(batch: pa.Table, embeddings: str, output: str, storage: dict, gallery: Gallery,
                   policy: AssignPolicy, fps: float, settings: dict[str, Any],
                   assigned: dict[str, pa.Table] | None) -> pa.Table:
    """The per-episode task (Ray Data ``map_batches``, one episode per batch): assign, screen time,
    write both partitions, then ``_SUCCESS``; returns one summary row per episode."""
    src = locate(embeddings, **storage)
    out = locate(output, **storage)
    summaries = []
    for episode in batch["episode_id"].to_pylist():
        started = time.perf_counter()
        marker = partition(out, "identities", episode).join(SUCCESS)
        delete_files(marker.fs, [marker.path])  # a redo: never a new file under an old _SUCCESS
        identities = assigned[episode] if assigned is not None else \
            assign_tracks(_episode_templates(src, episode), gallery, policy)
        rows = _read_partition(src, "embeddings", episode, ["track_id", "frame", "timestamp"])
        times = screen_time(rows, identities, fps)
        write_parquet_atomic(out.fs, partition(out, "identities", episode).join("part-0.parquet").path,
                             identities)
        times_path = partition(out, "screen_time", episode).join("part-0.parquet").path
        write_parquet_atomic(out.fs, times_path, times)
        kinds = identities["kind"].to_pylist()
        summary = {"episode_id": episode, "tracks": identities.num_rows, "matched": kinds.count("gallery"),
                   "clustered": kinds.count("cluster"), "faces": rows.num_rows,
                   "seconds": round(time.perf_counter() - started, 3)}
        write_atomic(marker.fs, marker.path, json.dumps({"settings": settings, **summary}).encode())
        summaries.append(summary)
    return pa.Table.from_pylist(summaries)


def _done(out: Location, episode: str, key: str) -> bool:
    marker = partition(out, "identities", episode).join(SUCCESS)
    if not exists(marker):
        return False
    try:
        meta = json.loads(read_bytes(marker.fs, marker.path))
    except (OSError, ValueError):
        return False
    return _settings_key(meta.get("settings", {})) == key


def _open_gallery(uri: str, contract: str, cfg) -> tuple[Gallery, int]:
    probe = VectorStore(uri, contract, cfg.storage.endpoint_url, cfg.storage.region)
    stamp = probe.read_stamp()
    if stamp is None:
        raise ConfigError(f"no gallery at {uri}: enroll identities first (arcface gallery enroll)")
    dim = int(stamp["embedding_dim"])
    store = probe.open(stamp.get("model_id", "?"), dim)  # another contract: refused, naming both
    gallery = load_gallery(store, dim)
    return gallery, dim


def _contract(manifests: dict[str, dict[str, Any]], uri: str) -> str:
    by_episode = {ep: manifest.get("contract") for ep, manifest in manifests.items()}
    unnamed = [ep for ep, c in by_episode.items() if not isinstance(c, str) or not c]
    if unnamed:
        raise ConfigError(f"{uri}: the _SUCCESS of episode {unnamed[0]} names no embedding contract (or is "
                          "not the JSON the job writes): its vectors' model is unknown")
    contracts = set(by_episode.values())
    if len(contracts) != 1:
        raise ConfigError(f"{uri} holds episodes of several embedding contracts "
                          f"{sorted(map(str, contracts))}: assign each model's output separately")
    return contracts.pop()


def run_assign(spec: AssignSpec) -> dict[str, Any]:
    """Assign every committed episode of ``spec.embeddings``; returns the report (JSON-able)."""
    import ray

    from .job import _ensure_ray
    from .settings import load_job_settings

    cfg = load_config(spec.config)
    ident = cfg.identity
    storage = {"endpoint_url": cfg.storage.endpoint_url, "region": cfg.storage.region}
    gallery_uri = spec.gallery or ident.gallery
    if not gallery_uri:
        raise ConfigError("no gallery: give --gallery PATH|s3://... or set identity.gallery in the config")
    fps = spec.fps if spec.fps is not None else ident.fps
    if not (fps > 0 and math.isfinite(fps)):  # inf would put every track at 0 s on screen
        raise ConfigError(f"--fps must be a finite number > 0, got {fps}")
    policy = AssignPolicy(ident.threshold if spec.threshold is None else spec.threshold,
                          ident.cluster_distance if spec.cluster_distance is None else spec.cluster_distance,
                          spec.across)
    if not -1 <= policy.threshold <= 1 or not 0 <= policy.cluster_distance <= 2:
        raise ConfigError(f"--threshold is a cosine in [-1, 1] and --cluster-distance a cosine distance in "
                          f"[0, 2]; got {policy.threshold} and {policy.cluster_distance}")
    src = locate(spec.embeddings, **storage)
    episodes = committed_episodes(src)
    if not episodes:
        raise ConfigError(f"{spec.embeddings}: no committed episode (run arcface embed-episodes first)")
    manifests = {ep: read_success(src, ep) or {} for ep in episodes}  # each _SUCCESS read once
    contract = _contract(manifests, spec.embeddings)
    gallery, dim = _open_gallery(gallery_uri, contract, cfg)
    for episode in episodes:  # every input checked before any work
        rows = manifests[episode].get("rows", 0)
        templates = partition(src, "templates", episode)
        if exists(templates) and list_files(templates, recursive=False):
            check_templates(_read_partition(src, "templates", episode, [*TEMPLATE_COLUMNS, "contract"]),
                            episode, dim, contract)
        elif not isinstance(rows, int) or rows > 0:  # no good row, no template: the only such case
            raise ConfigError(f"{spec.embeddings}: episode {episode} is committed with {rows} rows but its "
                              "templates file is missing: re-run embed-episodes into a new output")
        frames = _read_partition(src, "embeddings", episode, ["track_id", "frame", "timestamp"])
        try:  # each row's instant (frame ids or timestamps), checked with no assignment to count
            screen_time(frames, IDENTITY_SCHEMA.empty_table(), fps)
        except (ValueError, TypeError, KeyError) as exc:
            raise ConfigError(f"embeddings of episode {episode}: {exc}") from None
    output = spec.output or src.join("assignments").uri
    out = locate(output, **storage)
    settings = {"gallery": gallery_uri, "gallery_version": gallery.version, "contract": contract,
                **asdict(policy), "fps": fps}
    if spec.across:
        settings["episodes"] = hashlib.sha256("\n".join(episodes).encode()).hexdigest()[:16]
    key = _settings_key(settings)
    todo = [ep for ep in episodes if not _done(out, ep, key)]
    logger.info("assign-tracks: %d episodes, %d to do, gallery %s v%d (%d identities)", len(episodes),
                len(todo), gallery_uri, gallery.version, len(gallery))
    assigned = None
    if spec.across and todo:
        every = pa.concat_tables([_episode_templates(src, ep) for ep in episodes], promote_options="default")
        table = assign_tracks(every, gallery, policy)
        assigned = {ep: table.filter(pc.equal(table["episode_id"], ep)) for ep in todo}
    started = time.perf_counter()
    summaries: list[dict] = []
    if todo:
        _ensure_ray(load_job_settings())
        ds = ray.data.from_items([{"episode_id": ep} for ep in todo], override_num_blocks=len(todo))
        ds = ds.map_batches(assign_episode, batch_size=1, batch_format="pyarrow",
                            concurrency=spec.concurrency,
                            fn_kwargs={"embeddings": src.uri, "output": out.uri, "storage": storage,
                                       "gallery": gallery, "policy": policy, "fps": fps, "settings": settings,
                                       "assigned": assigned})
        summaries = ds.take_all()
    combined = _write_combined(out, episodes)
    return {"embeddings": spec.embeddings, "gallery": gallery_uri, "gallery_version": gallery.version,
            "identities_in_gallery": len(gallery), "output": out.uri, "episodes": len(episodes),
            "assigned": len(summaries), "skipped": len(episodes) - len(summaries),
            "tracks": combined["identities"].num_rows,
            "matched": int(np.sum(np.asarray(combined["identities"]["kind"].to_pylist()) == "gallery")),
            "settings": settings, "seconds": round(time.perf_counter() - started, 2),
            "identities_file": out.join("identities.parquet").uri,
            "screen_time_file": out.join("screen_time.parquet").uri,
            "screen_time": combined["screen_time"].to_pylist()}


def _write_combined(out: Location, episodes: list[str]) -> dict[str, pa.Table]:
    """``identities.parquet`` / ``screen_time.parquet`` at the root: every committed episode, atomically."""
    result = {}
    for name, schema in (("identities", IDENTITY_SCHEMA), ("screen_time", SCREEN_TIME_SCHEMA)):
        parts = [_read_partition(out, name, ep, None).select(schema.names).cast(schema) for ep in episodes
                 if exists(partition(out, "identities", ep).join(SUCCESS))]
        table = pa.concat_tables(parts) if parts else schema.empty_table()
        write_parquet_atomic(out.fs, out.join(f"{name}.parquet").path, table)
        result[name] = table
    return result


def format_screen_time(rows: list[dict], limit: int = 40) -> str:
    head = (f"{'episode':<12} {'identity':<28} {'seconds':>8} {'frames':>7} {'tracks':>6} {'first s':>8} "
            f"{'last s':>8}")
    lines = [head, "-" * len(head)]
    for r in rows[:limit]:
        lines.append(f"{r['episode_id']:<12} {r['identity']:<28} {r['seconds']:>8.2f} {r['frames']:>7} "
                     f"{r['tracks']:>6} {r['first_seen_s']:>8.2f} {r['last_seen_s']:>8.2f}")
    if len(rows) > limit:
        lines.append(f"... {len(rows) - limit} more rows in screen_time.parquet")
    return "\n".join(lines)
