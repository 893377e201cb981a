"""The screen-time part of ``arcface demo``: episodes of the sample faces embedded by the job,
their tracks assigned to the sample gallery (the identify step's, or made here), and the
screen-time table."""

from __future__ import annotations

from typing import Any

from engines import DemoStep


def demo_step(cfg, model, workdir, verbose: bool = False) -> dict[str, Any]:
    import ray.data  # noqa: F401  (configures Ray Data's loggers, which quiet_console then quiets)

    from engines import SAMPLE_JITTER, get_engine, make_sample_gallery, quiet_console

    from .assign_tracks import AssignSpec, format_screen_time, run_assign
    from .job import JobSpec, run_job
    from .sample import make_sample_episodes
    from .settings import load_job_settings

    print("\n== 8. tracks -> identities, screen time per episode ==", flush=True)
    if not verbose:
        quiet_console("ray")
    sample = make_sample_gallery(get_engine(cfg.embedding.backend, cfg.embedding.model, config=cfg),
                                 workdir / "gallery")
    episodes = make_sample_episodes(workdir / "identity-sample", episodes=2, tracks=5, frames=10,
                                    jitter=SAMPLE_JITTER, mirror=False)
    out = workdir / "identity-out"
    config = cfg.source if cfg.source != "<defaults>" else None
    # the demo's one local Ray (see data_jobs/demo.py), shut down when the demo exits
    run_job(JobSpec(input=episodes.directory, output=str(out), embedding_config=config,
                    model=cfg.embedding.model, settings=load_job_settings()))
    report = run_assign(AssignSpec(str(out), sample.uri, threshold=sample.threshold,
                                   cluster_distance=1 - sample.threshold, fps=25.0, config=config))
    print(f"assign-tracks: {report['tracks']} tracks of {report['episodes']} episodes, {report['matched']} "
          f"matched to the gallery at cosine >= {sample.threshold:.3f} ({sample.stranger} is not enrolled: "
          "an unknown cluster)")
    print(format_screen_time(report["screen_time"]))
    import pyarrow.parquet as pq

    from engines import source_faces

    faces = source_faces()
    right = 0
    for row in pq.read_table(report["identities_file"]).to_pylist():
        # make_sample_episodes: track t of episode e follows face (e * tracks + t) % 7
        face = faces[(int(row["episode_id"][2:]) * 5 + int(row["track_id"][5:])) % len(faces)].name
        right += row["identity"] == face if face in sample.enrolled else row["kind"] == "cluster"
    print(f"{right} of {report['tracks']} tracks labelled as the faces they follow")
    ok = right == report["tracks"] and sum(r["frames"] for r in report["screen_time"]) == episodes.faces
    return {"name": "assign", "ok": ok, "identities": report["identities_file"],
            "screen_time": report["screen_time_file"]}


STEP = DemoStep("assign", 8, "skip the track assignment / screen time step", demo_step)
