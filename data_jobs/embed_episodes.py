"""The episode job's command line: arguments -> ``JobSpec``, the report, exit codes.

``python -m data_jobs.embed_episodes`` and ``arcface embed-episodes`` both end here. Flags
override ``config/episodes.yaml``. No flag or parameter stages a failure: the fault tests
kill real processes from outside (``tests/helpers/processes.py``, ``tests/helpers/s3_gate.py``).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from engines import (
    ConfigError,
    cpu_summary,
    load_config,
    locate,
    ratio_parts,
    ratio_summary,
    run_with_exit_codes,
)

from .job import JobReport, JobSpec, _engine_overrides, inprocess_reference, run_job
from .job import __doc__ as JOB_DOC
from .settings import load_job_settings
from .sources import discover


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = parser or argparse.ArgumentParser(
        prog="python -m data_jobs.embed_episodes",
        description=JOB_DOC,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
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
    p.add_argument(
        "--lance",
        metavar="URI",
        help="also write a Lance vector store here (local or s3://; episodes.lance_uri)",
    )
    p.add_argument(
        "--min-quality", type=float, help="episodes.min_quality: least norm that counts in a template"
    )
    p.add_argument(
        "--max-crops-per-track", type=int, help="episodes.max_crops_per_track: best-k per template"
    )
    p.add_argument("--template-weighting", choices=("norm", "uniform"), help="episodes.template_weighting")
    p.add_argument("--progress-interval", type=float, help="episodes.progress_interval_s")
    p.add_argument(
        "--compare-inprocess",
        action="store_true",
        help="also time the same engine in this process on the same crops",
    )
    p.add_argument("--json", action="store_true", help="print the report as the last line, as JSON")
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
    settings = load_job_settings(
        args.job_config,
        actors_min=lo,
        actors_max=hi,
        batch_size=args.batch_size,
        actor_num_gpus=args.num_gpus,
        actor_accelerator_type=args.accelerator_type,
        lance_uri=args.lance,
        min_quality=args.min_quality,
        max_crops_per_track=args.max_crops_per_track,
        template_weighting=args.template_weighting,
        progress_interval_s=args.progress_interval,
    )
    return JobSpec(
        input=args.input,
        output=args.output,
        embedding_config=args.config,
        backend=args.backend,
        model=args.model,
        device=args.device,
        settings=settings,
    )


def format_report(r: JobReport) -> str:
    lines = [
        f"episodes  {r.episodes} ({r.episodes_skipped} already committed, "
        f"{r.episodes_committed} committed now)",
        f"faces     {r.faces} committed ({r.faces_embedded} embedded by this run), {r.failures} failures, "
        f"{r.rows_processed} rows processed this run",
        f"time      {r.seconds:.1f} s -> {r.faces_per_s:.1f} faces/s embedded (excluding cluster start)",
        f"output    {r.output}  (engine {r.engine.get('model_id')}, contract {r.engine.get('contract')})",
        f"driver    peak RSS {r.driver_peak_rss_mb:.0f} MiB",
    ]
    if r.lance:
        lines.append(
            f"lance     {r.lance['uri']}: {r.lance['episodes_appended']} episodes appended "
            f"({r.lance['episodes_backfilled']} backfilled), {r.lance['tracks_indexed'] or 0} tracks indexed "
            f"({r.lance['index_type']})"
        )
    if r.shell_cpu and r.shell_cpu["cpu_s"]:
        lines.append(f"cpu       {cpu_summary(r.shell_cpu)}")
    if r.inprocess_fps:
        lines.append(
            f"in-process engine {r.inprocess_fps:.1f} faces/s; job / in-process = {r.ratio_to_inprocess:.2f}"
        )
    if r.ratio_parts:
        lines.append(f"why       {ratio_summary(r.ratio_parts)}")
    return "\n".join(lines)


def run_from_args(args: argparse.Namespace) -> int:
    spec = spec_from_args(args)
    report = run_job(spec)
    if args.compare_inprocess and report.rows_processed:
        cfg = load_config(spec.embedding_config, overrides=_engine_overrides(spec))
        index = discover(
            locate(spec.input, cfg.storage.endpoint_url, cfg.storage.region), spec.settings.image_extensions
        )
        engine_cpu = inprocess_reference(spec, index, spec.settings.batch_size, cfg=cfg)
        report.inprocess_fps = engine_cpu.faces_per_s
        if report.inprocess_fps > 0:  # zero where no input decoded: nothing to compare
            report.ratio_to_inprocess = report.faces_per_s / report.inprocess_fps
            shell = report.shell_cpu or {}
            report.ratio_parts = ratio_parts(engine_cpu, shell.get("cpu_ms_per_face"),
                                             shell.get("cores_busy"), shell.get("steady_cpu_ms_per_face"))
    print(format_report(report), flush=True)
    if args.json:
        print(json.dumps(report.to_dict()), flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    args = build_parser().parse_args(argv)
    return run_with_exit_codes("embed-episodes", lambda: run_from_args(args))


if __name__ == "__main__":
    sys.exit(main())
