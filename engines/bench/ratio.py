"""Why a shell's throughput is the fraction it is of the same engine's in-process.

Where the shell (proxy, replica loop, decode, Ray's own processes, the load generator) and the
engine share a machine's cores, a run's throughput is the cores it kept busy over the CPU it
spent per face, and so is the engine's alone in-process. Hence, exactly up to the engine's
own cost per face differing between the two (another batch size):

    ratio to in-process = (E / T) x (cores busy in the run / cores busy in-process)

with ``E`` the engine's CPU ms per face in-process and ``T`` all the CPU the run spent per
face. ``E / T``, the engine's share of the run's CPU, is the ratio's ceiling while every core
is busy: a ratio of 0.95 needs everything but the engine (``T - E``) to cost at most
``E / 19`` per face. The second factor is the cores the run left idle (a whole-CPU
reservation, batches waiting to fill, a closed loop too small to fill them). A ratio far below
the share says the run waited; one near it says the shell's CPU is the limit, which only
cutting the shell (``synthetic:probe`` measures it alone) or moving it to other cores raises.
On a GPU node the engine's CPU is near zero and the ratio says little: what counts there is
the shell's faces per core (``engines.bench.cpu_cost``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any


@dataclass
class ProcessCpu:
    """This process's CPU (all its threads: an engine's thread pool included) and wall time over
    a ``with`` block; ``faces`` is set by the caller to what the block embedded."""

    faces: int = 0
    cpu_s: float = 0.0
    wall_s: float = 0.0

    def __enter__(self) -> ProcessCpu:
        self._cpu0, self._wall0 = time.process_time(), time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.cpu_s = time.process_time() - self._cpu0
        self.wall_s = time.perf_counter() - self._wall0

    @property
    def cpu_ms_per_face(self) -> float | None:
        return 1000 * self.cpu_s / self.faces if self.faces else None

    @property
    def faces_per_s(self) -> float:
        return self.faces / self.wall_s if self.wall_s > 0 else 0.0

    @property
    def cores_busy(self) -> float | None:
        return self.cpu_s / self.wall_s if self.wall_s > 0 else None


def ratio_parts(engine: ProcessCpu, run_cpu_ms_per_face: float | None, run_cores_busy: float | None,
                run_steady_cpu_ms_per_face: float | None = None) -> dict[str, Any] | None:
    """The two factors of the ratio to in-process (module docstring), for a report: the engine's
    CPU per face and cores busy in-process, the run's, the engine's share of the run's CPU and
    the cores-busy ratio (their product is the ratio over the span the run's CPU was measured
    on); with ``run_steady_cpu_ms_per_face`` (the run's CPU per face without its workers'
    start-up) the share a long run approaches. None where a figure is missing (a run that
    embedded nothing, a service whose processes were not seen)."""
    e, t = engine.cpu_ms_per_face, run_cpu_ms_per_face
    if not e or not t or not engine.cores_busy or not run_cores_busy:
        return None
    share, busy = e / t, run_cores_busy / engine.cores_busy
    parts = {
        "engine_cpu_ms_per_face": round(e, 4),
        "inprocess_cores_busy": round(engine.cores_busy, 2),
        "run_cpu_ms_per_face": round(t, 4),
        "run_cores_busy": round(run_cores_busy, 2),
        "other_cpu_ms_per_face": round(t - e, 4),  # shell and load generator: what a cut can remove
        "engine_share_of_cpu": round(share, 3),
        "cores_busy_ratio": round(busy, 3),
    }
    if run_steady_cpu_ms_per_face:
        parts["steady_engine_share_of_cpu"] = round(e / run_steady_cpu_ms_per_face, 3)
    return parts


def ratio_summary(parts: dict[str, Any]) -> str:
    """One line of ``ratio_parts``: the share and the cores (the reports' text)."""
    line = (f"engine share of the CPU {parts['engine_share_of_cpu']:.2f} (engine "
            f"{parts['engine_cpu_ms_per_face']:.2f} of {parts['run_cpu_ms_per_face']:.2f} CPU ms per face) x "
            f"cores busy {parts['run_cores_busy']:.2f} / {parts['inprocess_cores_busy']:.2f} in-process")
    if "steady_engine_share_of_cpu" in parts:
        line += f"; share without workers' start-up {parts['steady_engine_share_of_cpu']:.2f}"
    return line
