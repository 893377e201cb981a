"""The offline part of ``arcface demo``: sample episodes from the insightface faces, run the
episode job on them (local Ray), show the output, and re-run it to show it resumes."""

from __future__ import annotations

import logging
from typing import Any

from engines import DemoStep

logger = logging.getLogger(__name__)


def demo_step(cfg, model, workdir, verbose: bool = False) -> dict[str, Any]:
    import ray.data  # noqa: F401  (configures Ray Data's loggers, which quiet_console then quiets)

    from engines import quiet_console

    from .embed_episodes import format_report
    from .job import JobSpec, run_job
    from .reader import read_committed
    from .sample import make_sample_episodes
    from .settings import load_job_settings

    print("\n== 6. offline job: Ray Data over sample episodes ==", flush=True)
    if not verbose:
        quiet_console("ray")
    sample = make_sample_episodes(workdir / "sample", episodes=3, tracks=3, frames=12, corrupt=1)
    print(f"sample-episodes: {sample.faces} faces + {sample.corrupt} corrupt file in {sample.directory}")
    out = workdir / "episodes-out"
    spec = JobSpec(input=sample.directory, output=str(out),
                   embedding_config=cfg.source if cfg.source != "<defaults>" else None,
                   model=cfg.embedding.model, settings=load_job_settings())
    # the Ray of an earlier step if there is one (else the job starts it); left running for the
    # later steps, shut down when the demo exits
    report = run_job(spec)
    print(format_report(report))
    rows = read_committed(str(out))
    print(f"output rows {rows.num_rows}, columns {rows.column_names}")
    again = run_job(spec)
    print(f"re-run: {again.episodes_skipped} episodes already committed, "
          f"{again.rows_processed} rows processed (resume skips finished work)")
    ok = rows.num_rows == sample.decodable and report.failures == sample.corrupt and again.rows_processed == 0
    return {"name": "offline", "ok": ok, "report": report.to_dict(), "output": str(out)}


STEP = DemoStep("offline", 6, "skip the offline job step", demo_step)
