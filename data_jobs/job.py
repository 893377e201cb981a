"""Offline episode embedding on Ray Data.

    python -m data_jobs.embed_episodes --input I --output O [--backend B] [--model M] [--lance URI]
    ray job submit --working-dir . -- python -m data_jobs.embed_episodes --input ... --output ...

Plan: index the input (driver, ids only: no image bytes, no pass-through values) -> skip
committed episodes and already-staged rows -> read -> decode/align (CPU tasks) -> embed
(actor pool, ``compute=ActorPoolStrategy``, ``num_gpus`` per actor) -> stage (distributed
writes) while each episode whose rows are all staged is committed by a Ray task
(``scheduler.py``, ``commit.py``), and optionally appended to a Lance store
(``lance_store.py``). See ``commit.py`` for the output layout and why a crash or a killed
worker loses and duplicates nothing. The driver holds the index and per-episode counts;
no row, crop or vector passes through it.

With ``RAY_ADDRESS`` set (``ray job submit`` sets it) the driver joins that
cluster; otherwise it starts a local one. Clusters with token auth need
nothing more: the job's driver inherits the credentials.
"""

from __future__ import annotations

import logging
import os
import resource
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from engines import (
    ConfigError,
    CpuSampler,
    Location,
    ProcessCpu,
    check_output_dir,
    configured_model,
    delete_files,
    list_files,
    load_config,
    locate,
    model_contract,
    orphan_tmp_files,
)

from .commit import CommitRequest, EpisodeResult, committed_episodes
from .decode import DecodeLimits
from .progress import Progress
from .quality import TemplatePolicy
from .scheduler import CommitScheduler
from .settings import EpisodeJobSettings, local_ray_system_config
from .sources import InputIndex, discover, make_uid
from .staging import (
    STAGING_DIR,
    StagedEpisode,
    StagingDatasink,
    list_staged,
    remove_staging,
    remove_staging_root,
    staged_files,
)

logger = logging.getLogger(__name__)

EMBEDDING_DIM = 512  # the contract's dimension, where the graph does not state it


@dataclass
class JobReport:
    input: str
    output: str
    episodes: int
    episodes_skipped: int
    episodes_committed: int
    inputs: int
    rows_processed: int
    faces: int  # rows committed by this run (some may have been embedded by an earlier, crashed one)
    faces_embedded: int  # rows embedded by this run: what faces_per_s counts
    failures: int
    seconds: float
    faces_per_s: float
    engine: dict[str, Any] = field(default_factory=dict)
    driver_peak_rss_mb: float = 0.0  # this process's peak resident memory (ru_maxrss)
    lance: dict[str, Any] | None = None  # the store: uri, episodes appended / backfilled, tracks indexed
    inprocess_fps: float | None = None
    ratio_to_inprocess: float | None = None
    # the ratio's two factors (engines.bench.ratio): the engine's share of the CPU the job spent
    # per face, and the cores the job kept busy against in-process
    ratio_parts: dict[str, Any] | None = None
    # CPU of the driver's process tree (a local cluster started here: actors, tasks, raylet) from
    # the cluster's start to the job's end, by role, per face embedded (engines.bench.cpu_cost);
    # on a cluster this run did not start, the driver's only
    shell_cpu: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class JobSpec:
    input: str
    output: str
    embedding_config: str | None = None
    backend: str | None = None
    model: str | None = None
    device: str | None = None
    settings: EpisodeJobSettings = field(default_factory=EpisodeJobSettings)


def peak_rss_mb() -> float:
    """This process's peak resident set size, MiB (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# Ray Data's executors share a cluster through one coordinator, each holding a reservation that
# its driver renews every 10 s; a driver that dies (SIGKILL, a lost node) cannot cancel its own,
# and under Ray's default of 180 s the resumed run then waits three minutes for its resources
# (measured: a resumed job idle for 170 s on a 2-core cluster). 30 s is three renewals.
RESERVATION_EXPIRY_ENV = "RAY_DATA_AUTOSCALING_REQUEST_EXPIRE_TIME_S"
RESERVATION_EXPIRY_S = 30


def _ensure_ray(settings: EpisodeJobSettings) -> None:
    # read by Ray Data when its autoscaler module is first imported, i.e. before this job's
    # first dataset; a value the user set stays
    os.environ.setdefault(RESERVATION_EXPIRY_ENV, str(RESERVATION_EXPIRY_S))
    import ray

    if not ray.is_initialized():
        address = os.environ.get("RAY_ADDRESS")
        if address:
            ray.init(address=address)
        else:
            ray.init(include_dashboard=False, object_store_memory=512 << 20,
                     _system_config=local_ray_system_config(settings))
    # also when a caller (the demo, a notebook) started Ray: the job's own stall timeout applies
    ctx = ray.data.DataContext.get_current()
    ctx.execution_no_progress_timeout_s = settings.execution_no_progress_timeout_s


def _engine_overrides(spec: JobSpec) -> dict[str, Any]:
    return {"embedding.backend": spec.backend, "embedding.model": spec.model, "embedding.device": spec.device}


def _check_output_contract(committed: dict[str, dict], contract: str, output: str) -> None:
    other = {ep: m.get("contract") for ep, m in committed.items() if m.get("contract") != contract}
    if other:
        ep, theirs = next(iter(other.items()))
        raise ConfigError(
            f"output {output} already holds episodes of embedding contract {theirs} (e.g. {ep}); this run "
            f"would write contract {contract} (another model or preprocessing). Vectors of different "
            "contracts must not be mixed: use a new --output"
        )


def _check_staged_contract(staged: dict[str, StagedEpisode], contract: str, output: str) -> None:
    """Staging of an interrupted run with another model: committing would mix its vectors with this
    run's (or wedge on them); say how to finish or drop it instead."""
    other = {ep: s.contracts for ep, s in staged.items() if set(s.contracts) - {contract}}
    if not other:
        return
    ep, contracts = next(iter(other.items()))
    theirs, model_id = next((c, m) for c, m in contracts.items() if c != contract)
    raise ConfigError(
        f"output {output} holds rows staged by an interrupted run and not committed yet ({len(other)} "
        f"episode(s), e.g. {ep}) of embedding contract {theirs} (model id {model_id}); this run would write "
        f"contract {contract}. Finish that run first (re-run it with the same --model and --config), or "
        f"delete {output}/_staging to drop its uncommitted rows, or use a new --output"
    )


@dataclass(frozen=True)
class Exclusions:
    """Rows this run does not read: those of committed episodes, and rows already staged."""

    episodes: pa.Array
    uids: pa.Array

    @classmethod
    def of(cls, done_episodes: set[str], staged: dict[str, StagedEpisode]) -> Exclusions:
        uids = sorted(set().union(*(s.uids for s in staged.values())))
        return cls(pa.array(sorted(done_episodes), pa.string()), pa.array(uids, pa.string()))

    def keep(self, table: pa.Table) -> pa.Table:
        if len(self.episodes):
            table = table.filter(pc.invert(pc.is_in(table["episode_id"], self.episodes)))
        if len(self.uids):
            table = table.filter(pc.invert(pc.is_in(table["uid"], self.uids)))
        return table


def _slices(table: pa.Table, rows: int, max_blocks: int = 256) -> list[pa.Table]:
    """The index cut into blocks of about ``rows`` rows: decode tasks start on the first
    block at once, where ``repartition`` would first shuffle the whole index."""
    size = max(rows, -(-table.num_rows // max_blocks))
    return [table.slice(i, size) for i in range(0, table.num_rows, size)] or [table]


def _with_uid(batch: pa.Table, exclusions: Exclusions, pass_through: pa.Schema) -> pa.Table:
    """A manifest block: ids as strings, ``uid``, every pass-through column (typed as the manifest's
    unified schema, null where this file lacks it), and only the rows this run reads."""
    for col in ("episode_id", "track_id", "frame"):
        batch = batch.set_column(batch.schema.get_field_index(col), col, pc.cast(batch[col], pa.string()))
    batch = batch.append_column("uid", make_uid(batch["episode_id"], batch["track_id"], batch["frame"]))
    for f in pass_through:
        if f.name not in batch.column_names:
            batch = batch.append_column(f, pa.nulls(batch.num_rows, f.type))
        elif batch.schema.field(f.name).type != f.type:
            batch = batch.set_column(batch.schema.get_field_index(f.name), f, batch[f.name].cast(f.type))
    return exclusions.keep(batch)


def _source_dataset(index: InputIndex, exclusions: Exclusions, settings: EpisodeJobSettings):
    """The rows to embed, as a Ray dataset. Directory layout: the driver's index (ids and paths).
    Manifest: read on the cluster, so image bytes and pass-through values never reach the driver."""
    import ray

    if index.kind == "directory":
        return ray.data.from_arrow(_slices(exclusions.keep(index.table), settings.decode_batch_size)), None
    base = index.location.path if not index.location.path.endswith(".parquet") else (
        index.location.path.rsplit("/", 1)[0]
    )
    ds = ray.data.read_parquet(list(index.manifest_files), filesystem=index.location.fs)
    ds = ds.map_batches(_with_uid, batch_format="pyarrow", num_cpus=settings.decode_num_cpus,
                        fn_kwargs={"exclusions": exclusions, "pass_through": index.pass_through})
    # A Parquet row group is one read block (a whole episode, often): split it, streaming,
    # so decode tasks run side by side and the actors get crops while the rest decodes.
    return ds.repartition(target_num_rows_per_block=8 * settings.decode_batch_size), base


def _s3_settings(cfg) -> dict[str, str | None]:
    return {"endpoint_url": cfg.storage.endpoint_url, "region": cfg.storage.region}


def run_pipeline(spec: JobSpec, index: InputIndex, exclusions: Exclusions, output: Location, cfg,
                 tracker: Any = None) -> None:
    from ray.data import ActorPoolStrategy

    from .decode import decode_table
    from .embed_actor import EmbedActor

    s = spec.settings
    ds, base = _source_dataset(index, exclusions, s)
    ds = ds.map_batches(
        decode_table,
        batch_format="pyarrow",
        batch_size=s.decode_batch_size,
        num_cpus=s.decode_num_cpus,
        fn_kwargs={"filesystem": index.location.fs, "base": base, "s3": _s3_settings(cfg),
                   "limits": DecodeLimits.of(s)},
    )
    ds = ds.map_batches(
        EmbedActor,
        batch_format="pyarrow",
        batch_size=s.batch_size,
        compute=ActorPoolStrategy(
            min_size=s.actors_min,
            max_size=s.actors_max,
            max_tasks_in_flight_per_actor=s.max_tasks_in_flight_per_actor,
        ),
        num_gpus=s.actor_num_gpus,
        num_cpus=s.actor_num_cpus,
        accelerator_type=s.actor_accelerator_type,
        fn_constructor_kwargs={
            "config_path": cfg.source if cfg.source != "<defaults>" else None,
            "overrides": _engine_overrides(spec),
            "placement_log_dir": s.placement_log_dir,
        },
    )
    sink = StagingDatasink(output, tracker)
    ds.write_datasink(sink, ray_remote_args={"num_cpus": s.write_num_cpus})


def _clean_leftovers(output: Location, episodes: list[str], committed: set[str]) -> None:
    """Staging of committed episodes (a commit cut short before its clean-up, a duplicate write
    that landed after the commit, a crashed write's temporary file), and a write probe's
    temporary file: the job's own files only (``remove_staging``). At the start and the end,
    when no write is in flight."""
    root = output.join(STAGING_DIR)
    present = {i.path[len(root.path) + 1 :].split("/")[0] for i in list_files(root)}
    for episode in sorted(present & committed & set(episodes)):
        files = staged_files(output, episode)
        if files:
            logger.info("removing the leftover staging of committed episode %s (%d files)", episode,
                        len(files))
        remove_staging(output, episode, files)
    remove_staging_root(output)
    delete_files(output.fs, orphan_tmp_files(output))


def _episode_uids(index: InputIndex) -> tuple[pa.Array, dict[str, tuple[int, int]]]:
    """The index's uids grouped by episode, and episode -> (offset, length) into them."""
    table = index.table.select(["episode_id", "uid"])
    table = table.sort_by([("episode_id", "ascending"), ("uid", "ascending")])
    runs = pc.run_end_encode(table["episode_id"].combine_chunks())
    ends = runs.run_ends.to_numpy()
    starts = np.r_[0, ends[:-1]]
    spans = {ep: (int(a), int(b - a)) for ep, a, b in zip(runs.values.to_pylist(), starts, ends, strict=True)}
    return table["uid"].combine_chunks(), spans


def _lance_target(spec: JobSpec, cfg, index: InputIndex, contract: str, dim: int):
    uri = spec.settings.lance_uri
    if not uri:
        return None
    from .lance_store import target_for

    return target_for(uri, contract, index.pass_through, dim, cfg.storage.endpoint_url, cfg.storage.region)


def run_job(spec: JobSpec) -> JobReport:
    """Embed every episode of ``spec.input`` not yet committed in ``spec.output``.

    Everything that can refuse the run does so before Ray starts: the input (``discover``:
    malformed, or a pass-through column named like an output column), the output (not a
    directory, not writable), another contract in the output, committed or staged, or in
    the Lance store."""
    cfg = load_config(spec.embedding_config, overrides=_engine_overrides(spec))
    storage = cfg.storage
    input_loc = locate(spec.input, storage.endpoint_url, storage.region)
    output = locate(spec.output, storage.endpoint_url, storage.region)
    check_output_dir(output, probe=False)
    index = discover(input_loc, spec.settings.image_extensions)
    model = configured_model(cfg)
    contract = model_contract(model)
    episodes = index.episodes
    committed = committed_episodes(output, episodes)
    _check_output_contract(committed, contract, output.uri)
    found = list_staged(output, set(episodes))
    staged = {ep: s for ep, s in found.items() if ep not in committed}
    _check_staged_contract(staged, contract, output.uri)
    dim = model.embedding_dim or EMBEDDING_DIM
    target = _lance_target(spec, cfg, index, contract, dim)
    if target is not None:  # another contract's store: refused here, before any work
        target.store.open(model.model_id, dim)
    to_commit = [ep for ep in episodes if ep not in committed]
    if to_commit or len(found) > len(staged) or target is not None:
        check_output_dir(output, probe=True)
        _clean_leftovers(output, episodes, set(committed))
    exclusions = Exclusions.of(set(committed), staged)
    uids, spans = _episode_uids(index)
    owed = {ep: spans[ep][1] - len(staged[ep].uids if ep in staged else ()) for ep in to_commit}
    rows_to_process = sum(owed.values())
    logger.info(
        "%d episodes (%d committed, skipped), %d inputs, %d rows already staged, %d to embed",
        len(episodes), len(committed), index.table.num_rows, sum(len(s.uids) for s in staged.values()),
        rows_to_process,
    )
    engine = {"model_id": model.model_id, "model_sha256": model.sha256, "contract": contract,
              "synthetic": model.synthetic, "config": cfg.source}
    job = {"input": input_loc.uri, "settings": asdict(spec.settings)}
    policy = TemplatePolicy.of(spec.settings)

    def request(ep: str) -> CommitRequest:
        start, length = spans[ep]
        before = pa.array(sorted(staged[ep].uids), pa.string()) if ep in staged else pa.array([], pa.string())
        # a copy: a slice of an Arrow array pickles its whole buffer
        expected = pc.take(uids, pa.array(np.arange(start, start + length)))
        return CommitRequest(ep, expected, engine, job, policy, index.pass_through, before, target)

    work = bool(to_commit) or target is not None  # a run with nothing to do writes nothing
    progress = Progress(output, input_loc.uri, len(episodes), len(committed), rows_to_process,
                        spec.settings.progress_interval_s) if work else None
    started = time.perf_counter()
    sampler = None
    try:
        results: dict[str, EpisodeResult] = {}
        store = None
        if work:
            _ensure_ray(spec.settings)
            started = time.perf_counter()  # cluster start is not job time
            sampler = CpuSampler().start()  # nor is its CPU
            progress.started = time.monotonic()
            store = _store_committer(target, model.model_id, spec.settings)
        if to_commit:
            scheduler = CommitScheduler(output, to_commit, request, owed, spec.settings.commit_num_cpus,
                                        progress, store)
            pipeline = ((lambda tracker: run_pipeline(spec, index, exclusions, output, cfg, tracker))
                        if rows_to_process else (lambda tracker: None))
            results = scheduler.run(pipeline)
            _clean_leftovers(output, episodes, set(committed) | set(results))
        lance = _finish_store(store, output, [*committed, *results], spec.settings)
        seconds = time.perf_counter() - started
        report = _report(spec, input_loc, output, index, committed, results, rows_to_process, seconds, engine,
                         lance)
        if sampler is not None:
            report.shell_cpu = sampler.stop().per_face(report.faces_embedded)
            sampler = None
    except BaseException as exc:
        if sampler is not None:
            sampler.stop()
        if progress is not None:
            progress.close("failed", error=f"{type(exc).__name__}: {exc}"[:2000])
        raise
    if progress is not None:
        progress.close("done", report=report.to_dict())
    return report


def _store_committer(target, model_id: str, settings: EpisodeJobSettings):
    if target is None:
        return None
    from .lance_store import StoreCommitter

    return StoreCommitter(target, model_id, settings.lance_commit_interval_s)


def _finish_store(store, output: Location, committed: list[str], settings: EpisodeJobSettings):
    """Flush the store, backfill committed episodes it lacks, rebuild the templates' index."""
    if store is None:
        return None
    store.flush()
    backfilled = store.backfill(output, committed, settings.commit_num_cpus)
    indexed = None
    if store.appended:
        indexed = store.build_index(settings.lance_index_type, settings.lance_index_partitions)
    return {"uri": store.store.uri, "episodes_appended": len(store.appended),
            "episodes_backfilled": len(backfilled), "tracks_indexed": indexed,
            "index_type": settings.lance_index_type}


def _report(spec, input_loc, output, index, committed, results, rows_processed, seconds, engine,
            lance) -> JobReport:
    embedded = sum(r.embedded for r in results.values())
    return JobReport(
        input=input_loc.uri, output=output.uri, episodes=len(index.episodes), episodes_skipped=len(committed),
        episodes_committed=len(results), inputs=index.table.num_rows, rows_processed=rows_processed,
        faces=sum(r.rows for r in results.values()), faces_embedded=embedded,
        failures=sum(r.errors for r in results.values()), seconds=seconds,
        # faces this run embedded only: undecodable rows are cheap and would flatter the rate, and
        # rows an earlier run staged took none of this run's time
        faces_per_s=(embedded / seconds) if embedded and seconds > 0 else 0.0,
        engine=engine, driver_peak_rss_mb=round(peak_rss_mb(), 1), lance=lance,
    )


def inprocess_reference(spec: JobSpec, index: InputIndex, batch_size: int, limit: int = 2048,
                        cfg=None) -> ProcessCpu:
    """The same engine in this process on the same (decoded) crops: encode alone, its faces, wall
    time and CPU (the engine's thread pool included), for faces/s and CPU per face."""
    from engines import load_engine

    from .decode import decode_batch

    if index.has_inline_images:
        import pyarrow.parquet as pq

        table = pq.read_table(index.manifest_files[0], filesystem=index.location.fs).slice(0, limit)
    else:
        table = index.table.slice(0, min(limit, index.table.num_rows))
    if "uid" not in table.column_names:  # a manifest read whole: its rows, not the index's
        ids = [pc.cast(table[c], pa.string()) for c in ("episode_id", "track_id", "frame")]
        table = table.append_column("uid", make_uid(*ids))
    columns = {name: np.asarray(table[name].to_pylist(), dtype=object) for name in table.column_names}
    base = None if index.kind == "directory" else index.manifest_files[0].rsplit("/", 1)[0]
    cfg = cfg or load_config(spec.embedding_config, overrides=_engine_overrides(spec))
    decoded = decode_batch(columns, index.location.fs, base, _s3_settings(cfg),
                           DecodeLimits.of(spec.settings))
    crops = decoded["crop"][np.array([not e for e in decoded["error"]])]
    engine = load_engine(cfg)
    engine.encode(crops[:batch_size])
    with ProcessCpu(faces=len(crops)) as cpu:
        for i in range(0, len(crops), batch_size):
            engine.encode(crops[i : i + batch_size])
    return cpu
