"""Offline episode embedding on Ray Data.

    python -m data_jobs.embed_episodes --input I --output O [--backend B] [--model M]
    ray job submit --working-dir . -- python -m data_jobs.embed_episodes --input ... --output ...

Plan: index the input (driver, no image bytes) -> skip committed episodes and
already-staged rows -> read -> decode/align (CPU tasks) -> embed (actor pool,
``compute=ActorPoolStrategy``, ``num_gpus`` per actor) -> stage (distributed
writes) -> commit each episode (driver). See ``commit.py`` for the output
layout and why a crash or a killed worker loses and duplicates nothing.

With ``RAY_ADDRESS`` set (``ray job submit`` sets it) the driver joins that
cluster; otherwise it starts a local one. Clusters with token auth need
nothing more: the job's driver inherits the credentials.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from engines import ConfigError, configured_model, load_config, model_contract, run_with_exit_codes

from .commit import commit_episode, committed_episodes
from .decode import DecodeLimits
from .settings import EpisodeJobSettings, load_job_settings
from .sources import InputIndex, discover, make_uid
from .staging import StagedEpisode, StagingDatasink, list_staged, remove_staging
from .storage import Location, check_output_dir, delete_files, locate, orphan_tmp_files

logger = logging.getLogger("data_jobs.embed_episodes")


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
    inprocess_fps: float | None = None
    ratio_to_inprocess: float | None = None

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
    fault: dict[str, Any] = field(default_factory=dict)


def _ensure_ray(settings: EpisodeJobSettings) -> None:
    import ray

    if not ray.is_initialized():
        address = os.environ.get("RAY_ADDRESS")
        if address:
            ray.init(address=address)
        else:
            ray.init(include_dashboard=False, object_store_memory=512 << 20)
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


def _pending_rows(index: InputIndex, done_episodes: set[str], staged: dict[str, StagedEpisode]) -> pa.Table:
    table = index.table
    if done_episodes:
        table = table.filter(pc.invert(pc.is_in(table["episode_id"], pa.array(sorted(done_episodes)))))
    staged_all = set().union(*(s.uids for s in staged.values()))
    if staged_all:
        table = table.filter(pc.invert(pc.is_in(table["uid"], pa.array(sorted(staged_all)))))
    return table


def _slices(table: pa.Table, rows: int, max_blocks: int = 256) -> list[pa.Table]:
    """The index cut into blocks of about ``rows`` rows: decode tasks start on the first
    block at once, where ``repartition`` would first shuffle the whole index."""
    size = max(rows, -(-table.num_rows // max_blocks))
    return [table.slice(i, size) for i in range(0, table.num_rows, size)] or [table]


def _source_dataset(index: InputIndex, pending: pa.Table, settings: EpisodeJobSettings):
    import ray

    if index.kind == "directory":
        return ray.data.from_arrow(_slices(pending, settings.decode_batch_size)), None
    base = index.location.path if not index.location.path.endswith(".parquet") else (
        index.location.path.rsplit("/", 1)[0]
    )
    if not index.has_inline_images:
        return ray.data.from_arrow(_slices(pending, settings.decode_batch_size)), base
    wanted = pa.array(sorted(pending["uid"].to_pylist()))
    ds = ray.data.read_parquet(list(index.manifest_files), filesystem=index.location.fs)

    def with_uid(batch: pa.Table) -> pa.Table:
        for col in ("episode_id", "track_id", "frame"):
            batch = batch.set_column(batch.schema.get_field_index(col), col, pc.cast(batch[col], pa.string()))
        uid = pc.binary_join_element_wise(batch["episode_id"], batch["track_id"], batch["frame"], "/")
        batch = batch.append_column("uid", uid)
        return batch.filter(pc.is_in(uid, wanted))

    ds = ds.map_batches(with_uid, batch_format="pyarrow", num_cpus=settings.decode_num_cpus)
    # A Parquet row group is one read block (a whole episode, often): split it, streaming,
    # so decode tasks run side by side and the actors get crops while the rest decodes.
    return ds.repartition(target_num_rows_per_block=8 * settings.decode_batch_size), base


def _s3_settings(cfg) -> dict[str, str | None]:
    return {"endpoint_url": cfg.storage.endpoint_url, "region": cfg.storage.region}


def run_pipeline(spec: JobSpec, index: InputIndex, pending: pa.Table, output: Location, cfg) -> None:
    from ray.data import ActorPoolStrategy

    from .decode import decode_batch
    from .embed_actor import EmbedActor

    s = spec.settings
    ds, base = _source_dataset(index, pending, s)
    ds = ds.map_batches(
        decode_batch,
        batch_format="numpy",
        batch_size=s.decode_batch_size,
        num_cpus=s.decode_num_cpus,
        fn_kwargs={"filesystem": index.location.fs, "base": base, "s3": _s3_settings(cfg),
                   "limits": DecodeLimits.of(s)},
    )
    ds = ds.map_batches(
        EmbedActor,
        batch_format="numpy",
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
            "fault": {"kill_after_batches": spec.fault.get("kill_actor_after_batches"),
                      "marker": spec.fault.get("kill_actor_marker"),
                      "record_dir": spec.fault.get("record_actors_dir")},
        },
    )
    crash_after = spec.fault.get("crash_driver_after_files")
    sink = StagingDatasink(output, fault={"crash_driver_after_files": crash_after, "driver_pid": os.getpid()})
    ds.write_datasink(sink, ray_remote_args={"num_cpus": s.write_num_cpus})


def _clean_leftovers(output: Location, leftovers: dict[str, StagedEpisode]) -> None:
    """Staging of episodes committed before a crash ended their clean-up, and a write probe's
    temporary file: this job's own files only (``remove_staging``)."""
    for episode, staged in leftovers.items():
        logger.info("removing the leftover staging of committed episode %s (%d files)", episode,
                    len(staged.files))
        remove_staging(output, episode, staged.files)
    delete_files(output.fs, orphan_tmp_files(output))


def run_job(spec: JobSpec) -> JobReport:
    """Embed every episode of ``spec.input`` not yet committed in ``spec.output``.

    Everything that can refuse the run does so before Ray starts: the input (``discover``),
    the output (not a directory, not writable), another contract in the output, committed
    or staged."""
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
    leftovers = {ep: s for ep, s in found.items() if ep in committed}
    _check_staged_contract(staged, contract, output.uri)
    to_commit = [ep for ep in episodes if ep not in committed]
    if to_commit or leftovers:
        check_output_dir(output, probe=True)
        _clean_leftovers(output, leftovers)
    pending = _pending_rows(index, set(committed), staged)
    logger.info(
        "%d episodes (%d committed, skipped), %d inputs, %d rows already staged, %d to embed",
        len(episodes), len(committed), index.table.num_rows, sum(len(s.uids) for s in staged.values()),
        pending.num_rows,
    )
    started = time.perf_counter()
    if pending.num_rows:
        _ensure_ray(spec.settings)
        started = time.perf_counter()  # cluster start is not job time
        run_pipeline(spec, index, pending, output, cfg)
    engine = {"model_id": model.model_id, "model_sha256": model.sha256, "contract": contract,
              "synthetic": model.synthetic, "config": cfg.source}
    job = {"input": input_loc.uri, "settings": asdict(spec.settings)}
    by_episode = index.table.group_by("episode_id").aggregate([("uid", "list")])
    expected = dict(
        zip(by_episode["episode_id"].to_pylist(), by_episode["uid_list"].to_pylist(), strict=True)
    )
    results = [
        commit_episode(output, ep, set(expected[ep]), engine, job,
                       frozenset(staged[ep].uids) if ep in staged else frozenset())
        for ep in to_commit
    ]
    seconds = time.perf_counter() - started
    embedded = sum(r.embedded for r in results)
    return JobReport(
        input=input_loc.uri, output=output.uri, episodes=len(episodes), episodes_skipped=len(committed),
        episodes_committed=len(results), inputs=index.table.num_rows, rows_processed=pending.num_rows,
        faces=sum(r.rows for r in results), faces_embedded=embedded,
        failures=sum(r.errors for r in results), seconds=seconds,
        # faces this run embedded only: undecodable rows are cheap and would flatter the rate, and
        # rows an earlier run staged took none of this run's time
        faces_per_s=(embedded / seconds) if embedded and seconds > 0 else 0.0,
        engine=engine,
    )


def inprocess_reference(spec: JobSpec, index: InputIndex, batch_size: int, limit: int = 2048,
                        cfg=None) -> float:
    """The same engine in this process on the same (decoded) crops: faces/s of encode alone."""
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
    started = time.perf_counter()
    for i in range(0, len(crops), batch_size):
        engine.encode(crops[i : i + batch_size])
    return len(crops) / (time.perf_counter() - started)


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = parser or argparse.ArgumentParser(prog="python -m data_jobs.embed_episodes", description=__doc__,
                                          formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", required=True, help="episodes directory or Parquet manifest (local or s3://)")
    p.add_argument("--output", required=True, help="output directory (local or s3://)")
    p.add_argument("--config", help="embedding config (default $ARCFACE_CONFIG or config/embedding.yaml)")
    p.add_argument("--job-config", help="episode job config (default config/episodes.yaml)")
    p.add_argument("--backend", help="override embedding.backend")
    p.add_argument("--model", help="override embedding.model")
    p.add_argument("--device", help="override embedding.device")
    p.add_argument("--concurrency", help="actor pool size MIN,MAX (or N)")
    p.add_argument("--batch-size", type=int, help="faces per EmbedActor call")
    p.add_argument("--num-gpus", type=float, help="GPUs per EmbedActor")
    p.add_argument("--accelerator-type", help="GPU type per EmbedActor (Ray accelerator_type, e.g. A10G)")
    p.add_argument("--compare-inprocess", action="store_true",
                   help="also time the same engine in this process on the same crops")
    p.add_argument("--json", action="store_true", help="print the report as the last line, as JSON")
    # Fault injection, for tests only: proves a killed actor / driver loses and duplicates nothing.
    p.add_argument("--inject-kill-actor-after-batches", type=int, help=argparse.SUPPRESS)
    p.add_argument("--inject-kill-actor-marker", help=argparse.SUPPRESS)
    p.add_argument("--inject-crash-driver-after-files", type=int, help=argparse.SUPPRESS)
    # Tracing, for tests only: each actor appends what it embedded, and on which node, to a file here.
    p.add_argument("--record-actors-dir", help=argparse.SUPPRESS)
    return p


def _parse_concurrency(text: str | None) -> tuple[int | None, int | None]:
    if not text:
        return None, None
    try:
        parts = [int(p) for p in text.split(",")]
    except ValueError:
        raise ConfigError(f"--concurrency must be N or MIN,MAX, got {text!r}") from None
    if len(parts) == 1:
        parts = parts * 2
    if len(parts) != 2 or not 1 <= parts[0] <= parts[1]:
        raise ConfigError(f"--concurrency must be N or MIN,MAX with 1 <= MIN <= MAX, got {text!r}")
    return parts[0], parts[1]


def spec_from_args(args: argparse.Namespace) -> JobSpec:
    lo, hi = _parse_concurrency(args.concurrency)
    settings = load_job_settings(args.job_config, actors_min=lo, actors_max=hi, batch_size=args.batch_size,
                                 actor_num_gpus=args.num_gpus, actor_accelerator_type=args.accelerator_type)
    fault = {
        "kill_actor_after_batches": args.inject_kill_actor_after_batches,
        "kill_actor_marker": args.inject_kill_actor_marker,
        "crash_driver_after_files": args.inject_crash_driver_after_files,
        "record_actors_dir": args.record_actors_dir,
    }
    return JobSpec(input=args.input, output=args.output, embedding_config=args.config, backend=args.backend,
                   model=args.model, device=args.device, settings=settings,
                   fault={k: v for k, v in fault.items() if v is not None})


def format_report(r: JobReport) -> str:
    lines = [
        f"episodes  {r.episodes} ({r.episodes_skipped} already committed, "
        f"{r.episodes_committed} committed now)",
        f"faces     {r.faces} committed ({r.faces_embedded} embedded by this run), {r.failures} failures, "
        f"{r.rows_processed} rows processed this run",
        f"time      {r.seconds:.1f} s -> {r.faces_per_s:.1f} faces/s embedded (excluding cluster start)",
        f"output    {r.output}  (engine {r.engine.get('model_id')}, contract {r.engine.get('contract')})",
    ]
    if r.inprocess_fps:
        lines.append(
            f"in-process engine {r.inprocess_fps:.1f} faces/s; job / in-process = {r.ratio_to_inprocess:.2f}"
        )
    return "\n".join(lines)


def run_from_args(args: argparse.Namespace) -> int:
    spec = spec_from_args(args)
    report = run_job(spec)
    if args.compare_inprocess and report.rows_processed:
        cfg = load_config(spec.embedding_config, overrides=_engine_overrides(spec))
        index = discover(locate(spec.input, cfg.storage.endpoint_url, cfg.storage.region),
                         spec.settings.image_extensions)
        report.inprocess_fps = inprocess_reference(spec, index, spec.settings.batch_size, cfg=cfg)
        if report.inprocess_fps > 0:  # zero where no input decoded: nothing to compare
            report.ratio_to_inprocess = report.faces_per_s / report.inprocess_fps
    print(format_report(report), flush=True)
    if args.json:
        print(json.dumps(report.to_dict()), flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    args = build_parser().parse_args(argv)
    return run_with_exit_codes("embed-episodes", lambda: run_from_args(args))


if __name__ == "__main__":
    sys.exit(main())
