"""``arcface demo``: the README's main job, end to end on the embedded default.

Local, CPU, no cloud account: make the default model, embed the real faces the
insightface package ships, print the diagnostics and a drift check against
the insightface reference; then the steps the installed shells contribute
(``arcface.demo_steps`` entry points: serve them over HTTP and gRPC, run the
offline episode job). Each step prints what it did; the
exit code is non-zero if any check fails. The shell steps share one local Ray
(started by the first that needs it, shut down when the demo exits): four Ray
starts were a quarter of the demo's time.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import re
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from .common import Command, DemoStep, add_common
from .plugins import DEMO_STEPS_GROUP, load_plugins

logger = logging.getLogger(__name__)


# A line Ray forwards to the driver's terminal from another process: "(raylet) ...",
# "(EmbedActor pid=123) ...", colour codes first on a terminal. Ray prints these itself
# (not through logging), e.g. the retried-task notice every Serve shutdown leaves.
_FORWARDED = re.compile(r"^(\x1b\[[0-9;]*m)?\((raylet|autoscaler|pid=\d+|\S+ pid=\d+)[^)]*\)")


class _ForwardedLinesToFile(io.TextIOBase):
    """A text stream that passes the demo's own lines to ``terminal`` and sends Ray's forwarded
    lines (``_FORWARDED``) to ``log`` instead."""

    def __init__(self, terminal: TextIO, log: TextIO) -> None:
        self.terminal, self.log, self._partial = terminal, log, ""

    def writable(self) -> bool:
        return True

    def isatty(self) -> bool:
        return self.terminal.isatty()

    def fileno(self) -> int:  # a writer through the descriptor bypasses the filter, as before
        return self.terminal.fileno()

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return getattr(self.terminal, "encoding", "utf-8")

    def write(self, text: str) -> int:
        *lines, self._partial = (self._partial + text).split("\n")
        for line in lines:
            (self.log if _FORWARDED.match(line) else self.terminal).write(line + "\n")
        return len(text)

    def flush(self) -> None:
        self.terminal.flush()
        self.log.flush()


@contextlib.contextmanager
def _ray_lines_to(path: Path) -> Iterator[None]:
    """While the shell steps run, Ray's forwarded lines go to ``path``, not the terminal."""
    with path.open("a") as log:
        streams = sys.stdout, sys.stderr
        sys.stdout, sys.stderr = (_ForwardedLinesToFile(stream, log) for stream in streams)
        try:
            yield
        finally:
            for wrapper in (sys.stdout, sys.stderr):
                if wrapper._partial:  # type: ignore[union-attr]
                    wrapper.write("\n")
                wrapper.flush()
            sys.stdout, sys.stderr = streams


def _step(title: str) -> None:
    print(f"\n== {title} ==", flush=True)


def _similarity_table(names: list[str], emb: np.ndarray) -> str:
    sims = emb @ emb.T
    width = max(len(n) for n in names)
    head = " " * (width + 1) + " ".join(f"{i:>6d}" for i in range(len(names)))
    rows = [head]
    for i, name in enumerate(names):
        rows.append(f"{name:<{width}} " + " ".join(f"{s:6.3f}" for s in sims[i]))
    return "\n".join(rows)


RAY_LOGS = "/tmp/ray/session_latest/logs"  # Ray's default temp dir (ray.init's _temp_dir)


def demo_steps() -> list[DemoStep]:
    """The steps the installed shells contribute (online service, offline job), in order."""
    return sorted(load_plugins(DEMO_STEPS_GROUP, DemoStep), key=lambda step: step.order)


def run(args: argparse.Namespace) -> int:
    from ..config.loader import load_config
    from ..drift import run_embedding_regression_tests
    from ..factory import configured_model, load_engine, make_engine
    from ..models.sample_faces import eval_faces, source_faces

    started = time.perf_counter()
    cfg = load_config(getattr(args, "config", None),
                      overrides={"embedding.model": getattr(args, "model", None)})
    workdir = Path(args.workdir) if getattr(args, "workdir", None) else Path(
        tempfile.mkdtemp(prefix="arcface-demo-")
    )
    workdir.mkdir(parents=True, exist_ok=True)
    summary: dict[str, Any] = {"config": cfg.source}
    ok = True

    _step(f"1. model {cfg.embedding.model}")
    model = configured_model(cfg)
    print(f"path     {model.path}")
    print(f"sha256   {model.sha256}")
    if model.macs_per_face:
        print(f"compute  {model.macs_per_face / 1e9:.3f} GMAC per face")
    if model.synthetic:
        print("NOTE     SYNTHETIC model: real ArcFace architecture, seeded random weights; "
              "its embeddings identify nobody (set ARCFACE_MODEL=buffalo_l for real weights)")
    summary["model"] = model.to_dict()

    _step(f"2. engine (backend: {cfg.embedding.backend}, fallback: {list(cfg.embedding.fallback)})")
    engine = load_engine(cfg, model)
    info = engine.info
    for attempt in (info.fallback or {}).get("attempts", []):
        reason = f": {attempt['reason']}" if attempt["reason"] else ""
        print(f"  tried {attempt['backend']:<12} {attempt['status']}{reason}")
    print(json.dumps({k: v for k, v in info.to_dict().items() if k not in ("fallback",)}, indent=2))
    summary["engine"] = info.to_dict()

    _step("3. embed the faces the insightface package ships")
    faces = source_faces()
    crops = np.stack([f.crop for f in faces])
    t0 = time.perf_counter()
    emb, norms = engine.encode_with_norms(crops)
    dt = time.perf_counter() - t0
    names = [f"{i}:{f.name}" for i, f in enumerate(faces)]
    print(f"{len(faces)} faces from {sorted({f.image_file for f in faces})} in {dt * 1e3:.0f} ms; "
          f"embeddings {emb.shape} {emb.dtype}, norms before L2 {[round(float(n), 1) for n in norms]}")
    print("cosine similarity between the faces"
          + (" (synthetic weights: numbers show the plumbing, not identity)" if model.synthetic else ""))
    print(_similarity_table(names, emb))
    np.save(workdir / "faces_embeddings.npy", emb)
    summary["faces"] = {"n": len(faces), "embeddings": str(workdir / "faces_embeddings.npy")}

    _step(f"4. drift check: {info.backend} vs the {cfg.validation.reference_backend} reference")
    ref = make_engine(cfg.validation.reference_backend, model, cfg, "cpu")
    eval_set = eval_faces(cfg.validation.eval_set_size)
    report = run_embedding_regression_tests(eval_set, ref, engine, cfg.validation.max_drift_cosine)
    print(report.summary())
    summary["drift"] = report.to_dict()
    ok &= bool(report.passed)

    verbose = bool(getattr(args, "verbose", False))
    forwarded = workdir / "ray-forwarded.log"
    steps = demo_steps()
    if not verbose and steps:
        print(f"\n(Ray's own logs go to {RAY_LOGS}, and the lines Ray forwards from its processes to "
              f"{forwarded}; `arcface demo --verbose` shows them here too)")
    with contextlib.nullcontext() if verbose else _ray_lines_to(forwarded):
        for step in steps:
            if getattr(args, f"skip_{step.name}", False):
                continue
            result = step.run(cfg, model, workdir, verbose=verbose)
            summary[result["name"]] = result
            ok &= bool(result.get("ok", True))

    summary["seconds"] = round(time.perf_counter() - started, 1)
    (workdir / "demo.json").write_text(json.dumps(summary, indent=2, default=str))
    _step("done")
    print(f"{'all checks passed' if ok else 'SOME CHECKS FAILED'} in {summary['seconds']} s; "
          f"details in {workdir / 'demo.json'}")
    return 0 if ok else 1


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--verbose", action="store_true",
                   help=f"show Ray's own log lines in the terminal too (by default only in {RAY_LOGS})")
    for step in demo_steps():
        p.add_argument(f"--skip-{step.name}", action="store_true", help=step.skip_help)
    p.add_argument("--workdir", help="where demo data goes (default: a temp dir)")
    add_common(p)


COMMAND = Command("demo", "the README's main job: model, faces, diagnostics, drift", add_arguments, run,
                  order=50)
