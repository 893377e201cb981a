"""``arcface embed-episodes`` and ``arcface sample-episodes`` (registered into ``engines.cli``)."""

from __future__ import annotations

import argparse
import json

EMBED_HELP = "offline job: embed every face of many episodes (Ray Data)"


def cmd_embed_episodes(args: argparse.Namespace) -> int:
    """Parse the job's own arguments now: its parser lives in ``embed_episodes``, which imports
    Ray Data, and only this command may pay for that (see ``_add_embed``)."""
    from .embed_episodes import build_parser, run_from_args

    parser = build_parser(argparse.ArgumentParser(prog="arcface embed-episodes", description=EMBED_HELP))
    return run_from_args(parser.parse_args(args.job_args))


def cmd_sample_episodes(args: argparse.Namespace) -> int:
    from .sample import make_sample_episodes

    summary = make_sample_episodes(args.out, args.episodes, args.tracks, args.frames, args.corrupt, args.seed)
    print(f"{summary.faces} faces ({summary.episodes} episodes x {summary.tracks_per_episode} tracks x "
          f"{summary.frames_per_track} frames) + {summary.corrupt} corrupt files")
    print(f"directory layout  {summary.directory}")
    print(f"manifest layout   {summary.manifest}")
    if args.json:
        print(json.dumps({**summary.__dict__, "decodable": summary.decodable}))
    return 0


def _add_embed(sub) -> None:
    """A pass-through subparser: every argument (``--help`` included) goes to the job's own parser
    when the command runs, so building the ``arcface`` parser never imports Ray.
    (``prefix_chars`` no argument starts with: argparse then takes nothing as an option here.)"""
    p = sub.add_parser("embed-episodes", help=EMBED_HELP, add_help=False, prefix_chars="\0",
                       usage="arcface embed-episodes --input IN --output OUT [options] (--help: all)")
    p.add_argument("job_args", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)


def _add_sample(sub) -> None:
    from engines.cli import positive_int

    p = sub.add_parser("sample-episodes", help="build a small episode dataset from insightface's faces")
    p.add_argument("--out", required=True)
    p.add_argument("--episodes", type=positive_int, default=2)
    p.add_argument("--tracks", type=positive_int, default=3)
    p.add_argument("--frames", type=positive_int, default=8)
    p.add_argument("--corrupt", type=int, default=0, help="undecodable files to add (for error handling)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true")


def register(parsers: list, commands: dict) -> None:
    parsers.extend([_add_embed, _add_sample])
    commands["embed-episodes"] = cmd_embed_episodes
    commands["sample-episodes"] = cmd_sample_episodes
