"""How many CPU cores keep a GPU fed: the shells' own CPU cost per face, measured with the
zero-cost ``synthetic:probe`` model on each path, and the README's capacity table from it.

Each path runs as its own command, one after the other (never concurrently: they would share
the cores they measure), and reports the CPU seconds the service's or the job's processes
spent per face (``shell_cpu``: psutil over the processes the run started, the load generator
excluded; engines/bench/cpu_cost.py):

- ``http-npy``, ``http-json``, ``http-base64``: ``arcface bench-serve --start`` with the
  ``.npy`` body and answer, a plain JSON caller (base64 crops in, lists of numbers out), and
  JSON crops in with base64 float32 out;
- ``grpc``: ``arcface bench-serve --start --transport grpc`` (raw crops, packed answer);
- ``job``: ``arcface embed-episodes`` over ``arcface sample-episodes`` (8 x 8 x 100 = 6,400
  faces by default).

With the probe the engine costs next to nothing, so the CPU per face is the shell's, and
``steady_faces_per_cpu_s`` is what one core of shell sustains; a GPU embedding ``G`` faces/s
needs ``G / steady_faces_per_cpu_s`` cores of it. ``steady``: without the CPU Ray's worker
processes spend starting (``worker_start``, a fixed cost per process that a long job pays
once), which the table gives in its own column. ``--readme`` writes that table between the
``<!-- shell-capacity:begin -->`` / ``end`` markers, with the command and the CPU.

``--ratio-model`` (a real model, e.g. ``synthetic:mobilefacenet``) then runs each path again with
it and adds why its ratio to the in-process engine is what it is on this machine: the engine's
share of all the CPU the run spent per face, times the cores the run kept busy against
in-process (engines/bench/ratio.py), and what everything but the engine may cost per face for a
ratio of 0.95. ``--readme`` writes that table between the ``<!-- shell-ratio:begin -->`` / ``end``
markers.

    python scripts/shell_capacity.py --out out/shell-capacity --readme README.md \
        --ratio-model synthetic:mobilefacenet
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from engines import cpu_model_name, replace_readme_section
from engines.bench.cpu_cost import WORKER_START

logger = logging.getLogger("shell_capacity")

BEGIN, END = "<!-- shell-capacity:begin -->", "<!-- shell-capacity:end -->"
RATIO_BEGIN, RATIO_END = "<!-- shell-ratio:begin -->", "<!-- shell-ratio:end -->"
RATIO_AIM = 0.95  # issue 12's aim for the service at 8 faces per request
PATHS = ("http-npy", "http-json", "http-base64", "grpc", "job")
_SERVE_ENCODINGS = {"http-npy": ("npy", "npy"), "http-json": ("json", "json"),
                    "http-base64": ("json", "base64")}  # bench-serve --body, --accept
_TITLES = {
    "http-npy": "HTTP, `.npy` body and answer",
    "http-json": "HTTP, JSON (base64 crops, lists of numbers)",
    "http-base64": "HTTP, JSON (base64 crops, base64 float32 answer)",
    "grpc": "gRPC `EmbedBatch` (raw crops, packed answer)",
    "job": "offline job (`embed-episodes`)",
}


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (the config's 8000 / 9000 may be another service's)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _arcface(*args: str) -> list[str]:
    return [sys.executable, "-m", "engines", *args]


def _run_json(cmd: list[str], env: dict[str, str], timeout_s: float) -> dict[str, Any]:
    logger.info("running %s", " ".join(cmd[2:]))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout_s)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[2:])} exited {proc.returncode}: {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def serve_command(path: str, args: argparse.Namespace, concurrency: int | None = None) -> list[str]:
    cmd = _arcface("bench-serve", "--start", "--http-port", str(free_port()), "--grpc-port", str(free_port()),
                   "--concurrency", str(concurrency or args.concurrency),
                   "--faces-per-request", str(args.faces_per_request), "--duration", str(args.duration),
                   "--warmup", str(args.warmup), "--json")
    if path == "grpc":
        return [*cmd, "--transport", "grpc"]
    body, accept = _SERVE_ENCODINGS[path]
    return [*cmd, "--body", body, "--accept", accept]


def model_env(env: dict[str, str], model: str, backend: str | None) -> dict[str, str]:
    """The environment the commands read the model from (``backend`` None: the config's chain)."""
    out = {k: v for k, v in env.items() if k != "ARCFACE_BACKEND"}
    return {**out, "ARCFACE_MODEL": model, **({"ARCFACE_BACKEND": backend} if backend else {})}


def measure_job(args: argparse.Namespace, env: dict[str, str], workdir: Path) -> dict[str, Any]:
    sample = _run_json(_arcface(
        "sample-episodes", "--out", str(workdir / "sample"), "--episodes", str(args.episodes),
        "--tracks", str(args.tracks), "--frames", str(args.frames), "--json"), env, 600)
    report = _run_json(_arcface(
        "embed-episodes", "--input", sample["directory"], "--output", str(workdir / "out"),
        "--compare-inprocess", "--json"), env, 1800)  # model and backend: env (model_env)
    if report["failures"] or report["faces_embedded"] != sample["decodable"]:
        raise RuntimeError(f"the job embedded {report['faces_embedded']} of {sample['decodable']} faces "
                           f"({report['failures']} failures): not a measurement of the shell")
    return {"faces": report["faces_embedded"], "faces_per_s": report["faces_per_s"],
            "ratio_to_inprocess": report.get("ratio_to_inprocess"), "shell_cpu": report["shell_cpu"],
            "ratio_parts": report.get("ratio_parts"), "engine": report.get("engine")}


def measure(path: str, args: argparse.Namespace, env: dict[str, str], workdir: Path,
            concurrency: int | None = None) -> dict[str, Any]:
    if path == "job":
        return measure_job(args, env, workdir)
    out = _run_json(serve_command(path, args, concurrency), env, 900)
    return {"faces": out["faces"], "faces_per_s": out["throughput_fps"],
            "ratio_to_inprocess": out.get("ratio_to_inprocess"), "shell_cpu": out["shell_cpu"],
            "ratio_parts": out.get("ratio_parts"), "errors": out.get("errors"), "engine": out.get("engine"),
            "faces_per_request": out["faces_per_request"], "concurrency": out["concurrency"]}


def capacity(results: dict[str, dict[str, Any]], gpu_fps: list[float]) -> dict[str, dict[str, Any]]:
    """Per path: faces one core of shell sustains, and the cores a GPU of each rate needs."""
    table = {}
    for path, r in results.items():
        shell = r.get("shell_cpu") or {}
        per_core = shell.get("steady_faces_per_cpu_s", shell.get("faces_per_cpu_s"))
        table[path] = {"faces_per_cpu_s": per_core,
                       "cores_per_gpu": {str(int(g)): (g / per_core if per_core else None) for g in gpu_fps}}
    return table


def _top_roles(shell: dict[str, Any], n: int = 3) -> str:
    by_role = shell.get("cpu_ms_per_face_by_role", {})
    roles = sorted(((k, v) for k, v in by_role.items() if k != WORKER_START), key=lambda kv: -kv[1])[:n]
    return ", ".join(f"{k} {v:.2f}" for k, v in roles)


def markdown(report: dict[str, Any]) -> str:
    """The README section: the table, then how it was made."""
    gpus = [str(int(g)) for g in report["gpu_fps"]]
    head = ("| path | faces/s here | shell CPU ms per face (largest roles) | "
            "workers starting, CPU-s per run | faces per core of shell | "
            + " | ".join(f"cores per GPU at {int(g):,} faces/s" for g in report["gpu_fps"]) + " |")
    rows = [head, "|" + "---|" * (5 + len(gpus))]
    for path, r in report["results"].items():
        cap = report["capacity"][path]
        shell = r["shell_cpu"] or {}
        cores = " | ".join("-" if cap["cores_per_gpu"][g] is None else f"{cap['cores_per_gpu'][g]:.1f}"
                           for g in gpus)
        per_face = shell.get("steady_cpu_ms_per_face", shell.get("cpu_ms_per_face")) or 0
        rows.append(f"| {_TITLES.get(path, path)} | {r['faces_per_s']:.0f} | "
                    f"{per_face:.3f} ({_top_roles(shell)}) | {shell.get('startup_cpu_s', 0):.1f} | "
                    f"{cap['faces_per_cpu_s'] or 0:.0f} | {cores} |")
    s = report["settings"]
    rows += ["", f"Measured {report['date']} on {report['cpu']} ({report['cpus']} cores) with "
             f"`{report['command']}`: model `{s['model']}` on `{s['backend']}` (a zero-cost engine: the "
             f"CPU is the shells'), {s['concurrency']} clients x {s['faces_per_request']} faces per "
             f"request for {s['duration']} s per service path, {s['episodes']} x {s['tracks']} x "
             f"{s['frames']} faces for the job. CPU per face and faces per core leave out the CPU Ray's "
             f"worker processes spend starting (Python, `ray`, `ray.data` imported before their first "
             f"task: fixed per process, paid once however long the job), given in its own column. "
             f"Cores per GPU = the GPU's faces/s / faces per core of shell; raw figures in "
             f"`{report['out']}/report.json`."]
    return "\n".join(rows)


def _engine_name(engine: dict[str, Any] | None) -> str:
    engine = engine or {}
    return f"`{engine['backend']}` {engine.get('precision', '')}".strip() if engine.get("backend") else ""


def ratio_markdown(report: dict[str, Any]) -> str:
    """The README's second section: each path's ratio with a real model, split in its factors."""
    head = ("| path | faces/s here | ratio to in-process | engine share of the CPU | "
            "cores busy, run / in-process | engine CPU ms per face | everything else, CPU ms per face | "
            f"everything else at a ratio of {RATIO_AIM} |")
    rows = [head, "|" + "---|" * 8]
    ratio = report["ratio"]
    for path, r in ratio["results"].items():
        p = r.get("ratio_parts")
        if not p:
            rows.append(f"| {_TITLES.get(path, path)} | {r['faces_per_s']:.0f} | - | - | - | - | - | - |")
            continue
        share = f"{p['engine_share_of_cpu']:.2f}"
        if "steady_engine_share_of_cpu" in p:
            share += f" ({p['steady_engine_share_of_cpu']:.2f} without workers' start-up)"
        refused = sum((r.get("errors") or {}).values())
        fps = f"{r['faces_per_s']:.0f}" + (f" ({refused} requests refused)" if refused else "")
        rows.append(f"| {_TITLES.get(path, path)} | {fps} | {r['ratio_to_inprocess']:.2f} | "
                    f"{share} | {p['run_cores_busy']:.2f} / {p['inprocess_cores_busy']:.2f} | "
                    f"{p['engine_cpu_ms_per_face']:.2f} | {p['other_cpu_ms_per_face']:.2f} | "
                    f"{p['engine_cpu_ms_per_face'] * (1 - RATIO_AIM) / RATIO_AIM:.2f} |")
    s, engines = report["settings"], {_engine_name(r.get("engine")) for r in ratio["results"].values()} - {""}
    rows += ["", f"Measured {report['date']} on {report['cpu']} ({report['cpus']} cores) with "
             f"`{report['command']}`: model `{ratio['model']}` on {', '.join(sorted(engines))}, "
             f"each path as above, {ratio['concurrency']} clients x {s['faces_per_request']} faces per "
             f"request for the services, the job over {s['episodes']} x {s['tracks']} x {s['frames']} faces. "
             f"Ratio = engine share x cores busy (engines/bench/ratio.py). 'Everything else' is the "
             f"shell's CPU per face plus, for the services, the load generator's, all on the same cores; "
             f"its last column is the most it may cost for a ratio of {RATIO_AIM} with every core busy "
             f"(the engine's CPU per face x {1 - RATIO_AIM:.2f} / {RATIO_AIM})."]
    return "\n".join(rows)


def _gpu_rates(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected faces/s like 10000,30000, got {text!r}") from None
    if not values or min(values) <= 0:
        raise argparse.ArgumentTypeError(f"expected positive faces/s like 10000,30000, got {text!r}")
    return values


def _paths(text: str) -> list[str]:
    chosen = [p.strip() for p in text.split(",") if p.strip()]
    unknown = sorted(set(chosen) - set(PATHS))
    if not chosen or unknown:
        raise argparse.ArgumentTypeError(f"paths are {', '.join(PATHS)}; got {text!r}")
    return chosen


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--paths", type=_paths, default=list(PATHS),
                   help=f"comma-separated, of {', '.join(PATHS)}")
    p.add_argument("--model", default="synthetic:probe")
    p.add_argument("--backend", default="onnx")
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--faces-per-request", type=int, default=8)
    p.add_argument("--duration", type=float, default=10.0, help="seconds of measured load per service path")
    p.add_argument("--warmup", type=float, default=3.0)
    p.add_argument("--episodes", type=int, default=8)
    p.add_argument("--tracks", type=int, default=8)
    p.add_argument("--frames", type=int, default=100)
    p.add_argument("--gpu-fps", type=_gpu_rates, default=[10000.0, 30000.0],
                   help="GPU rates (faces/s) to size the shell for (default 10000,30000)")
    p.add_argument("--out", default="out/shell-capacity", help="where report.json goes")
    p.add_argument("--readme", help="write the table into this README's shell-capacity section")
    p.add_argument("--ratio-model", help="also run each path with this model and split its ratio to "
                   "in-process in its factors (README shell-ratio section)")
    p.add_argument("--ratio-backend", help="the backend for --ratio-model (default: the config's chain)")
    p.add_argument("--ratio-concurrency", type=int, default=8,
                   help="clients of the --ratio-model service runs (default 8: a real engine on a small "
                   "machine refuses part of 16 x 8 faces at the default 0.25 s queue bound, and refusing "
                   "costs CPU too)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    env = model_env({**os.environ, "RAY_ADDRESS": ""}, args.model, args.backend)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results, ratio = {}, {}
    with tempfile.TemporaryDirectory(prefix="shell-capacity-") as tmp:
        for path in args.paths:
            results[path] = measure(path, args, env, Path(tmp) / path)
            logger.info("%s: %.0f faces/s, shell %s", path, results[path]["faces_per_s"],
                        results[path]["shell_cpu"])
        for path in args.paths if args.ratio_model else ():
            ratio[path] = measure(path, args, model_env(env, args.ratio_model, args.ratio_backend),
                                  Path(tmp) / f"{path}-ratio", concurrency=args.ratio_concurrency)
            logger.info("%s with %s: ratio %s, %s", path, args.ratio_model, ratio[path]["ratio_to_inprocess"],
                        ratio[path]["ratio_parts"])
    command = "python scripts/shell_capacity.py " + " ".join(argv if argv is not None else sys.argv[1:])
    report = {
        "cpu": cpu_model_name(), "cpus": os.cpu_count(), "date": datetime.date.today().isoformat(),
        "command": command.strip(), "out": str(out), "gpu_fps": args.gpu_fps,
        "settings": {k: getattr(args, k) for k in ("model", "backend", "concurrency", "faces_per_request",
                                                    "duration", "episodes", "tracks", "frames")},
        "results": results, "capacity": capacity(results, args.gpu_fps),
    }
    if ratio:
        report["ratio"] = {"model": args.ratio_model, "backend": args.ratio_backend,
                           "concurrency": args.ratio_concurrency, "results": ratio}
    (out / "report.json").write_text(json.dumps(report, indent=2))
    text = markdown(report)
    (out / "report.md").write_text(text + "\n")
    print(text)
    if args.readme:
        replace_readme_section(args.readme, BEGIN, END, text)
    if ratio:
        ratio_text = ratio_markdown(report)
        (out / "ratio.md").write_text(ratio_text + "\n")
        print(ratio_text)
        if args.readme:
            replace_readme_section(args.readme, RATIO_BEGIN, RATIO_END, ratio_text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
