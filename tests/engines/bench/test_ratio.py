"""ProcessCpu over real CPU work, and the ratio's two factors against a ratio measured directly."""

from __future__ import annotations

import threading
import time

import pytest

from engines.bench.ratio import ProcessCpu, ratio_parts, ratio_summary


def _burn(cpu_s: float) -> None:
    """This thread's own CPU, however busy the host."""
    end = time.thread_time() + cpu_s
    while time.thread_time() < end:
        pass


def _work(faces: int, cpu_per_face_s: float, extra_per_face_s: float = 0.0) -> ProcessCpu:
    """``faces`` 'embedded' at a known CPU cost each (an engine), plus a known overhead (a shell)."""
    with ProcessCpu(faces=faces) as cpu:
        _burn(faces * (cpu_per_face_s + extra_per_face_s))
    return cpu


def test_process_cpu_counts_every_thread_of_the_process():
    with ProcessCpu(faces=10) as cpu:
        threads = [threading.Thread(target=_burn, args=(0.15,)) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert cpu.cpu_s >= 0.3 and cpu.wall_s > 0
    assert cpu.cpu_ms_per_face == pytest.approx(100 * cpu.cpu_s)
    assert cpu.cores_busy == pytest.approx(cpu.cpu_s / cpu.wall_s)
    assert cpu.faces_per_s == pytest.approx(10 / cpu.wall_s)
    assert ProcessCpu(faces=10).faces_per_s == 0.0  # never measured: no rate


def test_share_times_cores_busy_is_the_ratio_to_in_process():
    engine = _work(100, 0.002)  # the engine alone: 2 ms of CPU per face
    run = _work(100, 0.002, 0.002)  # the same faces with as much again spent around them
    ratio = (run.faces / run.wall_s) / (engine.faces / engine.wall_s)
    parts = ratio_parts(engine, run.cpu_ms_per_face, run.cores_busy)
    assert parts["engine_share_of_cpu"] * parts["cores_busy_ratio"] == pytest.approx(ratio, rel=0.02)
    assert parts["engine_share_of_cpu"] == pytest.approx(0.5, abs=0.1)  # half the run's CPU was the engine's
    assert parts["other_cpu_ms_per_face"] == pytest.approx(
        parts["run_cpu_ms_per_face"] - parts["engine_cpu_ms_per_face"], abs=1e-3)
    assert "steady_engine_share_of_cpu" not in parts
    assert f"engine share of the CPU {parts['engine_share_of_cpu']:.2f}" in ratio_summary(parts)


def test_steady_share_leaves_out_the_start_up():
    engine = _work(50, 0.002)
    parts = ratio_parts(engine, 2 * engine.cpu_ms_per_face, 1.0,
                        run_steady_cpu_ms_per_face=engine.cpu_ms_per_face)
    assert parts["steady_engine_share_of_cpu"] == pytest.approx(1.0)
    assert "without workers' start-up 1.00" in ratio_summary(parts)


@pytest.mark.parametrize("run_ms, run_busy", [(None, 1.0), (0.0, 1.0), (5.0, None), (5.0, 0.0)])
def test_nothing_to_say_without_the_runs_figures(run_ms, run_busy):
    assert ratio_parts(_work(10, 0.001), run_ms, run_busy) is None


def test_nothing_to_say_without_faces():
    assert ratio_parts(_work(0, 0.0), 5.0, 1.0) is None
