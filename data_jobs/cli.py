"""``arcface embed-episodes``, ``sample-episodes`` and ``assign-tracks``: plugged into ``arcface`` as
``arcface.commands`` entry points (pyproject.toml). Nothing here imports Ray until a command runs."""

from __future__ import annotations

import argparse
import json

from engines import Command, emit_json, positive_int

EMBED_HELP = "offline job: embed every face of many episodes (Ray Data)"


def cmd_embed_episodes(args: argparse.Namespace) -> int:
    """Parse the job's own arguments now: its parser lives in ``embed_episodes``, which imports
    Ray Data, and only this command may pay for that (see ``_add_embed``)."""
    from .embed_episodes import build_parser, run_from_args

    parser = build_parser(argparse.ArgumentParser(prog="arcface embed-episodes", description=EMBED_HELP))
    return run_from_args(parser.parse_args(args.job_args))


def cmd_sample_episodes(args: argparse.Namespace) -> int:
    from .sample import make_sample_episodes, make_synthetic_manifest

    if args.faces:
        synth = make_synthetic_manifest(args.out, args.faces, args.episodes, args.tracks, args.seed)
        print(f"{synth.faces} faces ({synth.episodes} episodes x {synth.tracks_per_episode} tracks) over "
              f"{synth.pool_files} pooled crops; pass-through columns timestamp, box, det_score, shot_id")
        print(f"manifest layout   {synth.manifest}")
        if args.json:
            print(json.dumps(synth.__dict__))
        return 0

    summary = make_sample_episodes(args.out, args.episodes, args.tracks, args.frames, args.corrupt, args.seed,
                                   jitter=args.jitter, mirror=not args.no_mirror)
    print(f"{summary.faces} faces ({summary.episodes} episodes x {summary.tracks_per_episode} tracks x "
          f"{summary.frames_per_track} frames) + {summary.corrupt} corrupt files")
    print(f"directory layout  {summary.directory}")
    print(f"manifest layout   {summary.manifest}")
    if args.json:
        print(json.dumps({**summary.__dict__, "decodable": summary.decodable}))
    return 0


def cmd_assign_tracks(args: argparse.Namespace) -> int:
    from .assign_tracks import AssignSpec, format_screen_time, run_assign

    report = run_assign(AssignSpec(args.embeddings, args.gallery, args.output, args.threshold,
                                   args.cluster_distance, args.fps, args.across_episodes, args.config,
                                   args.concurrency))
    if args.json:
        emit_json(report)
        return 0
    print(f"{report['episodes']} episodes ({report['assigned']} assigned now, {report['skipped']} already "
          f"done), {report['tracks']} tracks, {report['matched']} matched to the gallery "
          f"({report['identities_in_gallery']} identities, version {report['gallery_version']})")
    print(format_screen_time(report["screen_time"]))
    print(f"identities   {report['identities_file']}\nscreen time  {report['screen_time_file']}")
    return 0


def _assign_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--embeddings", required=True, help="an embed-episodes output (local or s3://)")
    p.add_argument("--gallery", help="the gallery (default: identity.gallery)")
    p.add_argument("--output", help="where to write (default: <embeddings>/assignments)")
    p.add_argument("--threshold", type=float,
                   help="cosine a track needs to match (default: identity.threshold)")
    p.add_argument("--cluster-distance", type=float,
                   help="average-linkage cosine distance of unknown tracks "
                        "(default: identity.cluster_distance)")
    p.add_argument("--fps", type=float,
                   help="face rows per second without timestamps (default: identity.fps)")
    p.add_argument("--across-episodes", action="store_true",
                   help="cluster unknown tracks over all episodes at once (redoes every episode)")
    p.add_argument("--concurrency", type=positive_int, default=2, help="episodes assigned in parallel")
    p.add_argument("--config", help="embedding config (default $ARCFACE_CONFIG or config/embedding.yaml)")
    p.add_argument("--json", action="store_true")


def _embed_arguments(p: argparse.ArgumentParser) -> None:
    """A pass-through subparser: every argument (``--help`` included) goes to the job's own parser
    when the command runs, so building the ``arcface`` parser never imports Ray.
    (``prefix_chars`` no argument starts with: argparse then takes nothing as an option here;
    see ``EMBED_EPISODES.parser_kwargs``.)"""
    p.add_argument("job_args", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)


def _sample_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True)
    p.add_argument("--episodes", type=positive_int, default=2)
    p.add_argument("--tracks", type=positive_int, default=3)
    p.add_argument("--frames", type=positive_int, default=8)
    p.add_argument("--corrupt", type=int, default=0, help="undecodable files to add (for error handling)")
    p.add_argument("--faces", type=positive_int,
                   help="instead: a synthetic manifest of N faces over --episodes x --tracks, in seconds "
                        "(pooled crops + pass-through columns; for scale runs)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--jitter", type=float, default=0.5,
                   help="per-frame jitter strength (identity demos with synthetic weights: 0.05)")
    p.add_argument("--no-mirror", action="store_true",
                   help="never mirror a crop (synthetic weights are not mirror-invariant)")
    p.add_argument("--json", action="store_true")


EMBED_EPISODES = Command(
    "embed-episodes", EMBED_HELP, _embed_arguments, cmd_embed_episodes, order=80,
    parser_kwargs={"add_help": False, "prefix_chars": "\0",
                   "usage": "arcface embed-episodes --input IN --output OUT [options] (--help: all)"},
)
SAMPLE_EPISODES = Command("sample-episodes", "build a small episode dataset from insightface's faces",
                          _sample_arguments, cmd_sample_episodes, order=90)
ASSIGN_TRACKS = Command("assign-tracks", "tracks -> gallery identities, and screen time (Ray Data)",
                        _assign_arguments, cmd_assign_tracks, order=85)
