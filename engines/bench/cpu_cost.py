"""CPU seconds the shell's processes spend, by role: what it costs to feed an engine.

A throughput figure says how fast a run went, not what it cost: on a GPU node the question is
how many CPU cores the proxy, replicas, decode tasks, writers and driver need to keep one GPU
fed. ``CpuSampler`` answers it from the processes' own CPU times (``psutil``, user + system),
sampled every ``interval_s`` over the process tree of this process (a local Ray cluster started
here: GCS, raylet, workers, actors) plus any ``extra_pids``. Each sample attributes a process's
CPU since the previous sample to its role *now*, read from its title: Ray names a worker after
what it runs (``ray::ServeReplica:app:Deployment``, ``ray::MapBatches(decode_table)``,
``ray::IDLE``), so a pooled worker's time goes to the task it ran. Exact for actors; for task
workers within one interval of a change of task; a process that exits between two samples
loses its last interval. A cluster this process did not start (``--address``) is not seen:
run the sampler on its nodes instead.

A worker's CPU before its first task (``ray::IDLE`` until then: Python, ``ray`` and, for a
Ray Data task, ``ray.data`` with pandas imported while the task's function is loaded; about
3.5 CPU-seconds each measured on the 6,400-face probe job) is ``worker_start``, not
``idle_workers``: a fixed cost per worker process, paid once per job however many faces it
embeds, so the reports give it apart (``startup_cpu_s``) and also the cost per face without
it (``steady_*``), the figure that holds for a long job.

No Ray import: the tree is found from the OS, so this works for any process layout.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import psutil

logger = logging.getLogger(__name__)

WORKER_START = "worker_start"  # a worker's CPU before its first task: fixed per process, not per face
IDLE = "idle_workers"

# First match wins: fused Ray Data tasks carry every operator's name (decode before read).
ROLES: tuple[tuple[str, re.Pattern[str]], ...] = tuple(
    (role, re.compile(pattern))
    for role, pattern in (
        ("replica", r"ServeReplica"),
        ("proxy", r"ProxyActor"),
        ("serve_controller", r"ServeController"),
        ("embed_actors", r"EmbedActor"),
        ("decode", r"decode"),
        ("write", r"Write|Datasink"),
        ("commit", r"commit_episode"),
        ("scheduler", r"StagingTracker"),
        ("read", r"Read|_with_uid|Repartition|split|from_arrow|FromArrow"),
        (IDLE, r"^ray::IDLE"),
    )
)
DRIVER = "driver"
RAY_SYSTEM = "ray_system"  # GCS, raylet, dashboard and runtime-env agents, log monitor
RAY_OTHER = "ray_other"


def role_of(title: str) -> str:
    """The role of a process from its command line / title (a Ray worker's title names what it runs)."""
    if title.startswith("ray::"):
        for role, pattern in ROLES:
            if pattern.search(title):
                return role
        return RAY_OTHER
    return RAY_SYSTEM


@dataclass
class CpuCost:
    """CPU seconds by role over a measured span, and what they mean per face."""

    wall_s: float
    cpu_s_by_role: dict[str, float] = field(default_factory=dict)

    @property
    def cpu_s(self) -> float:
        return sum(self.cpu_s_by_role.values())

    @property
    def startup_cpu_s(self) -> float:
        return self.cpu_s_by_role.get(WORKER_START, 0.0)

    def per_face(self, faces: int) -> dict[str, Any]:
        """Report fields: CPU ms per face by role and in all, mean cores busy, and the faces per
        CPU-second the whole shell sustains (with a zero-cost model: its ceiling per core); the
        same two without the workers' start-up (``steady_*``), and that start-up in CPU-seconds."""
        total, steady = self.cpu_s, self.cpu_s - self.startup_cpu_s
        return {
            "cpu_s": round(total, 3),
            "cpu_s_by_role": {k: round(v, 3) for k, v in sorted(self.cpu_s_by_role.items())},
            "cpu_ms_per_face": round(1000 * total / faces, 4) if faces else None,
            "cpu_ms_per_face_by_role": {
                k: round(1000 * v / faces, 4) for k, v in sorted(self.cpu_s_by_role.items())
            } if faces else {},
            "cores_busy": round(total / self.wall_s, 2) if self.wall_s > 0 else None,
            "faces_per_cpu_s": round(faces / total, 1) if total > 0 else None,
            "startup_cpu_s": round(self.startup_cpu_s, 3),
            "steady_cpu_ms_per_face": round(1000 * steady / faces, 4) if faces else None,
            "steady_faces_per_cpu_s": round(faces / steady, 1) if steady > 0 else None,
        }


def cpu_summary(fields: dict[str, Any]) -> str:
    """One line of ``CpuCost.per_face`` fields, the costliest role first (the reports' text);
    a run that embedded nothing (a resume that only backfills) has no per-face figures."""
    if not fields.get("cpu_ms_per_face"):
        return f"{fields['cpu_s']:.1f} CPU-seconds, no faces embedded"
    roles = ", ".join(f"{k} {v:.3f}" for k, v in sorted(fields["cpu_ms_per_face_by_role"].items(),
                                                       key=lambda kv: -kv[1]))
    line = (f"{fields['cpu_ms_per_face']:.3f} ms per face ({roles}); {fields['cores_busy']} cores busy; "
            f"{fields['faces_per_cpu_s']:.0f} faces per CPU-second")
    if fields.get("startup_cpu_s") and fields.get("steady_cpu_ms_per_face") is not None:
        line += (f"; of it {fields['startup_cpu_s']:.1f} CPU-s starting workers (fixed per run), "
                 f"{fields['steady_cpu_ms_per_face']:.3f} ms per face without")
    return line


class CpuSampler:
    """Samples the CPU times of this process's tree in a thread; ``with`` it around the measured
    span, or ``start()`` / ``stop()`` (which returns the ``CpuCost``). ``exclude_self``: this
    process's own CPU (a load generator living in the driver) is left out of the shell's cost."""

    def __init__(self, interval_s: float = 0.25, extra_pids: tuple[int, ...] = (),
                 exclude_self: bool = False) -> None:
        self.interval_s = interval_s
        self.extra_pids = extra_pids
        self.exclude_self = exclude_self
        self._root = psutil.Process(os.getpid())
        self._last: dict[int, tuple[float, float]] = {}  # pid -> (create_time, cpu seconds)
        self._worked: set[tuple[int, float]] = set()  # (pid, create_time) seen running something
        self._by_role: dict[str, float] = defaultdict(float)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._started = 0.0
        self.cost: CpuCost | None = None

    def _processes(self) -> list[psutil.Process]:
        procs = [] if self.exclude_self else [self._root]
        with contextlib.suppress(psutil.Error):
            procs += self._root.children(recursive=True)
        for pid in self.extra_pids:
            try:
                proc = psutil.Process(pid)
                procs += [proc, *proc.children(recursive=True)]
            except psutil.Error:
                continue
        return procs

    def _sample(self, baseline: bool = False) -> None:
        me = os.getpid()
        for proc in self._processes():
            try:
                with proc.oneshot():
                    times = proc.cpu_times()
                    cpu = times.user + times.system
                    born = proc.create_time()
                    title = " ".join(proc.cmdline()) or proc.name()
            except psutil.Error:  # gone, or not ours to read
                continue
            prev = self._last.get(proc.pid)
            if prev is not None and prev[0] != born:  # a recycled pid: a new process
                prev = None
            self._last[proc.pid] = (born, cpu)
            role = DRIVER if proc.pid == me else self._role(title, (proc.pid, born))
            if baseline:
                continue
            # first seen now: not in the baseline, so born during the span (all its CPU is the span's)
            before = prev[1] if prev is not None else 0.0
            if cpu > before:
                self._by_role[role] += cpu - before

    def _role(self, title: str, process: tuple[int, float]) -> str:
        """``role_of``, except that an idle worker that has not yet run anything is starting up."""
        role = role_of(title)
        if role == IDLE:
            return IDLE if process in self._worked else WORKER_START
        if role != RAY_SYSTEM:  # a Ray title naming what the process runs
            self._worked.add(process)
        return role

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sample()

    def start(self) -> CpuSampler:
        self._started = time.time()
        self._sample(baseline=True)
        self._thread = threading.Thread(target=self._run, name="cpu-sampler", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> CpuCost:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._sample()
        self.cost = CpuCost(time.time() - self._started, dict(self._by_role))
        logger.debug("shell CPU by role: %s", self.cost.cpu_s_by_role)
        return self.cost

    def __enter__(self) -> CpuSampler:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
