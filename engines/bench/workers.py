"""Side-by-side backend benchmark: throughput, per-batch latency, peak memory.

Each backend runs in its own spawned process (so its peak RSS is its own and a
crash or leak stays contained), and the parent drives them in interleaved
rounds, one at a time: A, B, A, B, ... On a shared, noisy machine a slow
minute then hurts every backend alike, which is what makes the speed-up
ratios meaningful even when absolute numbers wander.

Memory (``peak_mem_mb``, its kind in ``mem_kind``): on the CPU the worker's peak
resident set (``rss``); on a CUDA device the device memory the worker's engine
holds (``device``, see ``_DeviceMemory``), measured in the worker itself, with
CUDA imported only there and only for a GPU engine.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing as mp
import platform
import resource
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

SETTLE_S = 0.25  # pause between two workers' turns (see run_benchmark)


@dataclass
class BenchResult:
    backend: str
    model: str
    precision: str
    batch_size: int
    num_faces: int
    throughput_fps: float
    latency_ms_p50: float
    latency_ms_p99: float
    peak_mem_mb: float
    speedup: float
    device: str = "cpu"
    synthetic: bool = False
    probe: bool = False  # synthetic:probe: the figures are the harness's own cost, no model's
    requested_backend: str = ""
    error: str | None = None
    input_layout: str = ""  # nchw_float (host preprocessing) or nhwc_uint8_bgr (in the graph)
    mem_kind: str = "rss"  # what peak_mem_mb measures: "rss" (host, CPU engines) | "device" (GPU memory)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class BenchSpec:
    backend: str
    model: str
    batch_size: int
    precision: str | None = None
    device: str | None = None
    config_path: str | None = None
    # largest batch any run will send (the report runs several batch sizes per worker)
    max_batch_size: int | None = None
    # False: start the engine without the startup drift gate, so that a path the gate
    # would refuse can still be measured (the report shows its drift next to its speed)
    drift_gate: bool = True
    # embedding.preprocess for this worker (None: the config's): compare the in-graph
    # preprocessing with the host's side by side
    preprocess: str | None = None


def _peak_rss_mb() -> float:
    """This process's peak resident set. ``VmHWM`` belongs to the address space, which
    ``exec`` replaces; ``ru_maxrss`` survives ``exec`` on Linux, so a spawned worker would
    report its parent's peak when that is larger."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0  # kB
    except (OSError, ValueError, IndexError):
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


class _DeviceMemory:
    """Device memory one bench worker's engine holds, in bytes, from device-wide samples.

    ``cudaMemGetInfo`` sees the whole device, not one process, so the worker
    samples "used" (total - free) around its own work only and adds up the
    growth: around the engine start (GPU workers start one at a time, under
    the runners' shared start lock) and around each call the parent drives (the parent
    drives one worker at a time, so the others are idle meanwhile). That covers
    weights, TensorRT activation memory, ONNX Runtime's arena growing on the
    first large batch, I/O buffers. It is what stays allocated after each call,
    not a peak inside one; it leaves out the CUDA context itself (created by the
    first sample); another process allocating on the same device meanwhile is
    counted too, so read it on an otherwise idle GPU.
    """

    def __init__(self, used_bytes: Callable[[], int]) -> None:
        self._used_bytes = used_bytes
        self.held_bytes = 0

    @classmethod
    def for_device(cls, device: str) -> _DeviceMemory:
        """Sampler for ``cuda:N`` through ``engines.tensorrt.cuda`` (imported here: CPU runs never
        load CUDA)."""
        from ..hardware import device_index
        from ..tensorrt import cuda as cuda_rt

        index = device_index(device)

        def used_bytes() -> int:
            cuda_rt.set_device(index)
            free, total = cuda_rt.mem_get_info()
            return total - free

        meter = cls(used_bytes)
        used_bytes()  # create the context now, so its own memory is not charged to the engine
        return meter

    @contextlib.contextmanager
    def measure(self):
        before = self._used_bytes()
        try:
            yield
        finally:
            # freed by someone else meanwhile: count nothing rather than a negative amount
            self.held_bytes += max(0, self._used_bytes() - before)

    @property
    def held_mb(self) -> float:
        return self.held_bytes / 2**20


def _device_meter(device: str) -> _DeviceMemory | None:
    """A ``_DeviceMemory`` for a CUDA ``device``; ``None`` on the CPU or where CUDA cannot be asked
    (then the worker reports its peak RSS instead)."""
    if not device.startswith("cuda"):
        return None
    try:
        return _DeviceMemory.for_device(device)
    except Exception as exc:  # memory is context for the numbers, never a reason to fail the run
        logger.warning("cannot measure device memory on %s (%s); reporting peak RSS instead", device, exc)
        return None


def _worker(spec: BenchSpec, conn, gpu_start_lock=None) -> None:
    """Child process: start the engine, then run batches whenever the parent asks."""
    meter: _DeviceMemory | None = None
    try:
        from dataclasses import replace

        from ..config.loader import load_config
        from ..factory import get_engine
        from ..hardware import resolve_device
        from ..models.sample_faces import eval_faces, jittered_faces

        cfg = load_config(spec.config_path) if spec.config_path else load_config()
        if not spec.drift_gate:
            cfg = replace(cfg, validation=replace(cfg.validation, enabled=False))
        if spec.preprocess:
            cfg = replace(cfg, embedding=replace(cfg.embedding, preprocess=spec.preprocess))
        largest = max(spec.batch_size, spec.max_batch_size or 1)
        device = resolve_device(spec.device or cfg.embedding.device)
        with gpu_start_lock if device.startswith("cuda") and gpu_start_lock else contextlib.nullcontext():
            meter = _device_meter(device)
            with meter.measure() if meter else contextlib.nullcontext():
                engine = get_engine(
                    spec.backend,
                    spec.model,
                    batch_size=spec.batch_size,
                    max_batch_size=largest,
                    precision=spec.precision,
                    device=device,
                    config=cfg,
                )
        pool = jittered_faces(max(largest, 7), seed=123).faces
        info = engine.info.to_dict()
        if not str(info.get("device", device)).startswith("cuda"):
            meter = None  # the engine that started computes on the CPU: its memory is host memory
        conn.send(("ready", info))
    except BaseException as exc:  # report, never hang the parent
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
        conn.close()
        return
    while True:
        msg = conn.recv()
        if msg[0] == "stop":
            conn.send(("peak", _peak_rss_mb(), meter.held_mb if meter else None))
            conn.close()
            return
        try:
            with meter.measure() if meter else contextlib.nullcontext():
                if msg[0] == "eval":
                    out = ("embeddings", engine.encode(eval_faces(msg[1])))
                else:
                    _, batches, *size = msg
                    faces = pool[: size[0] if size else spec.batch_size]
                    latencies = []
                    for _ in range(batches):
                        started = time.perf_counter()
                        engine.encode(faces)
                        latencies.append(time.perf_counter() - started)
                    out = ("latencies", latencies)
        except BaseException as exc:
            conn.send(("error", f"{type(exc).__name__}: {exc}"))
            conn.close()
            return
        conn.send(out)


class _Runner:
    """One worker process. ``start_lock`` (one ``ctx.Lock()`` shared by the runners of a run)
    is held by a GPU worker while its engine starts, so device memory is charged to one
    engine at a time (see ``_DeviceMemory``)."""

    def __init__(self, spec: BenchSpec, ctx, start_lock) -> None:
        self.spec = spec
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker, args=(spec, child, start_lock), daemon=True)
        self.proc.start()
        child.close()
        self.info: dict[str, Any] = {}
        self.latencies: list[float] = []
        self.error: str | None = None

    def _recv(self, timeout: float):
        if not self.conn.poll(timeout):
            raise TimeoutError(f"benchmark worker for {self.spec.backend} did not answer in {timeout:.0f}s")
        return self.conn.recv()

    def _ask(self, request: tuple | None, timeout: float) -> Any:
        """Send ``request`` (``None``: only listen) and return the answer's payload; ``None``
        once the worker has failed, its error recorded in ``self.error`` (a failed worker is
        never asked again, so one broken backend cannot stop the others' measurement)."""
        if self.error:
            return None
        if request is not None:
            self.conn.send(request)
        try:
            msg = self._recv(timeout)
        except (TimeoutError, EOFError) as exc:
            self.error = str(exc) or "worker exited"
            return None
        if msg[0] == "error":
            self.error = msg[1]
            return None
        return msg[1]

    def wait_ready(self, timeout: float) -> None:
        info = self._ask(None, timeout)
        if info is not None:
            self.info = info

    def run(self, batches: int, timeout: float, batch_size: int | None = None) -> list[float]:
        """Run ``batches`` batches (of ``batch_size`` faces, default the spec's); their latencies."""
        request = ("run", batches) if batch_size is None else ("run", batches, batch_size)
        latencies = self._ask(request, timeout)
        if latencies is None:
            return []
        self.latencies.extend(latencies)
        return list(latencies)

    def embed_eval(self, n: int, timeout: float) -> np.ndarray | None:
        """This backend's embeddings of the first ``n`` eval faces (for drift)."""
        return self._ask(("eval", n), timeout)

    def stop(self) -> tuple[float, float | None]:
        """Stop the worker: ``(peak RSS MB, device MB or None)``; device MB only for a GPU engine."""
        peak, device_mb = float("nan"), None
        if not self.error:
            try:
                self.conn.send(("stop",))
                _, peak, device_mb = self._recv(60)
            except (TimeoutError, EOFError, OSError):
                pass
        self.proc.join(timeout=10)
        if self.proc.is_alive():
            self.proc.kill()
        return peak, device_mb


def run_benchmark(
    backends: list[str],
    model: str,
    batch_size: int = 32,
    num_faces: int = 256,
    warmup_batches: int = 2,
    rounds: int = 4,
    precision: str | None = None,
    device: str | None = None,
    config_path: str | None = None,
    specs: list[BenchSpec] | None = None,
    timeout_s: float = 900.0,
    progress: bool = False,
    preprocess: list[str] | None = None,
) -> list[BenchResult]:
    """Benchmark ``backends`` on ``model``; the first one is the speed-up baseline.

    ``specs`` overrides ``backends`` for mixed configurations (per-backend
    precision or batch size), as the report command uses. ``preprocess`` (e.g.
    ``["host", "graph"]``) runs every backend once per preprocessing mode.
    """
    if batch_size < 1 or num_faces < 1:
        raise ValueError(f"batch_size and num_faces must be >= 1, got {batch_size}, {num_faces}")
    specs = specs or [
        BenchSpec(b, model, batch_size, precision, device, config_path, preprocess=p)
        for b in backends for p in (preprocess or [None])
    ]
    ctx = mp.get_context("spawn")
    start_lock = ctx.Lock()
    runners = [_Runner(spec, ctx, start_lock) for spec in specs]
    for runner in runners:  # start one at a time would be slower; they only load
        runner.wait_ready(timeout_s)
    total_batches = max(1, -(-num_faces // batch_size))
    rounds = max(1, min(rounds, total_batches))
    per_round = [total_batches // rounds + (1 if i < total_batches % rounds else 0) for i in range(rounds)]
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(runners) * (total_batches + warmup_batches), desc="bench", unit="batch")
    for runner in runners:
        if warmup_batches:
            runner.run(warmup_batches, timeout_s)
            runner.latencies.clear()
            if bar:
                bar.update(warmup_batches)
    for n in per_round:
        for runner in runners:
            # the previous worker's runtime threads spin for a while after its last batch;
            # timing the next one before they park would charge it for their cycles
            time.sleep(SETTLE_S)
            runner.run(n, timeout_s)
            if bar:
                bar.update(n)
    if bar:
        bar.close()
    results = []
    for runner in runners:
        peak, device_mb = runner.stop()
        spec = runner.spec
        lat = np.asarray(runner.latencies, dtype=np.float64)
        ok = runner.error is None and lat.size > 0
        info = runner.info
        results.append(
            BenchResult(
                backend=info.get("backend", spec.backend),
                requested_backend=spec.backend,
                model=info.get("model_id", spec.model),
                precision=info.get("precision", spec.precision or "?"),
                batch_size=spec.batch_size,
                num_faces=int(lat.size * spec.batch_size),
                throughput_fps=float(lat.size * spec.batch_size / lat.sum()) if ok else 0.0,
                latency_ms_p50=float(np.percentile(lat, 50) * 1e3) if ok else float("nan"),
                latency_ms_p99=float(np.percentile(lat, 99) * 1e3) if ok else float("nan"),
                peak_mem_mb=device_mb if device_mb is not None else peak,
                speedup=0.0,
                device=info.get("device", spec.device or "?"),
                synthetic=bool(info.get("synthetic", False)),
                probe=bool(info.get("probe", False)),
                input_layout=str(info.get("input_layout", "")),
                error=runner.error,
                mem_kind="device" if device_mb is not None else "rss",
            )
        )
    base = results[0].throughput_fps if results else 0.0
    for r in results:
        r.speedup = float(r.throughput_fps / base) if base > 0 else 0.0
    return results


def machine_info() -> dict[str, Any]:
    from ..hardware import cpu_summary, cuda_device_count

    return {
        "cpu": cpu_summary(),
        "cuda_devices": cuda_device_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "date": time.strftime("%Y-%m-%d"),
    }


def _model_label(r: BenchResult) -> str:
    if r.probe:
        return f"{r.model} (PROBE)"
    return f"{r.model} (SYNTHETIC)" if r.synthetic else r.model


def _input_label(r: BenchResult) -> str:
    """``u8``: the graph does the preprocessing on the raw crops; ``f32``: numpy's blob."""
    return {"nhwc_uint8_bgr": "u8", "nchw_float": "f32"}.get(r.input_layout, "?")


def format_table(results: list[BenchResult]) -> str:
    """The human table: one row per backend, the model on every row, and what the memory
    column measures (``rss`` host peak or ``device`` GPU memory) next to its value."""
    width = max([len("model"), *(len(_model_label(r)) for r in results)])
    header = (
        f"{'backend':<12} {'model':<{width}} {'precision':<9} {'input':<5} {'batch':>5} {'faces/s':>9} "
        f"{'p50 ms':>8} {'p99 ms':>8} {'peak MB':>7} {'mem':<6} {'speedup':>7}"
    )
    lines = [header, "-" * len(header)]
    for r in results:
        if r.error:
            lines.append(f"{r.requested_backend:<12} {_model_label(r):<{width}} ERROR: {r.error}")
            continue
        lines.append(
            f"{r.backend:<12} {_model_label(r):<{width}} {r.precision:<9} {_input_label(r):<5} "
            f"{r.batch_size:>5} "
            f"{r.throughput_fps:>9.1f} {r.latency_ms_p50:>8.1f} {r.latency_ms_p99:>8.1f} "
            f"{r.peak_mem_mb:>7.0f} {r.mem_kind:<6} {r.speedup:>6.2f}x"
        )
    if any(r.probe for r in results):
        lines.append("PROBE: pooling + one linear layer, next to no compute; the figures are the "
                     "harness's own cost per face, no model's")
    if any(r.synthetic and not r.probe for r in results):
        lines.append("SYNTHETIC: seeded random weights, not a trained face model; the speed is real, "
                     "the embeddings identify nobody")
    kinds = {r.mem_kind for r in results if not r.error}
    if kinds:
        lines.append("peak MB: " + "; ".join(
            {"rss": "rss = the worker's peak resident host memory",
             "device": "device = GPU memory the engine holds (cudaMemGetInfo, CUDA context excluded)"}[k]
            for k in sorted(kinds)))
    return "\n".join(lines)
