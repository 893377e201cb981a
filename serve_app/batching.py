"""Face-counted batching arithmetic and live batch statistics (no Ray in here).

``@serve.batch`` only runs inside a real replica, so everything it needs that
can be tested without one lives here: how a request is cut into chunks that
fit a batch, how a batch of chunks becomes one engine call and back, and the
statistics ``/v1/info`` reports.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from engines import EmbeddingEngine, EngineInfo


@dataclass
class BatchItem:
    """One chunk of one request waiting in the batch queue; ``ticket``: its request's
    admission ticket (``admission.Ticket``), shared by the request's chunks."""

    faces: np.ndarray
    ticket: Any = None
    enqueued_at: float = field(default_factory=time.perf_counter)
    timing: Any = None  # its request's ``timing.RequestTiming``: the batch adds queue/compute
    trace_context: Any = None  # its request's OpenTelemetry context (``tracing``)
    enqueued_ns: int = field(default_factory=time.time_ns)  # wall clock, for the queue span


def count_faces(items: list) -> int:
    """``batch_size_fn`` for ``@serve.batch``: a batch is measured in faces.

    Must never raise (an exception here kills Serve's batching task, ray #66140),
    so anything unexpected counts as one face.
    """
    total = 0
    for item in items:
        faces = getattr(item, "faces", None)
        shape = getattr(faces, "shape", None)
        total += int(shape[0]) if shape else 1
    return total


def engine_batch_target(info: EngineInfo, config_opt_batch: int) -> tuple[int, str]:
    """The faces per ``@serve.batch`` batch when ``user_config.max_batch_size`` is null.

    The engine's own optimal batch where it has one: a backend whose runtime
    reports an optimization profile ``[min, opt, max]`` (``runtime.<name>.io.profile``,
    e.g. a TensorRT engine, whose profile is read from the plan itself and may
    differ from the config when the plan came from the cache or another config)
    is batched to its ``opt``. Otherwise ``config_opt_batch``
    (``embedding.opt_batch_size``: the batch ONNX Runtime's TensorRT EP profile
    is built for, and a sane size for the CPU runtimes). Never above the engine's
    ``max_batch_size``, beyond which it would chunk the batch again.
    Returns ``(batch, where it came from)`` for logs and ``/v1/info``.
    """
    for name, section in sorted((info.runtime or {}).items()):
        io = section.get("io") if isinstance(section, dict) else None
        profile = io.get("profile") if isinstance(io, dict) else None
        if (
            isinstance(profile, (list, tuple))
            and len(profile) == 3
            and all(isinstance(b, int) and not isinstance(b, bool) for b in profile)
            and 1 <= profile[0] <= profile[1] <= profile[2]
        ):
            opt = profile[1]
            batch = min(opt, info.max_batch_size)
            source = f"{name} engine profile opt batch ({profile[0]}/{opt}/{profile[2]})"
            if batch < opt:
                source += f", capped at the engine's max_batch_size {info.max_batch_size}"
            return batch, source
    return max(1, min(config_opt_batch, info.max_batch_size)), "embedding.opt_batch_size"


def split_request(faces: np.ndarray, max_batch: int) -> list[np.ndarray]:
    """Cut a request into chunks of at most ``max_batch`` faces.

    Serve rejects an item larger than ``max_batch_size``; chunks of one request
    are queued together and usually land in consecutive batches.
    """
    if max_batch < 1:
        raise ValueError(f"max_batch must be >= 1, got {max_batch}")
    return [faces[i : i + max_batch] for i in range(0, len(faces), max_batch)] or [faces]


def run_batch(engine: EmbeddingEngine, items: list[BatchItem]) -> list[tuple[np.ndarray, np.ndarray]]:
    """One engine call for all chunks of a batch; results split back per chunk."""
    sizes = [len(item.faces) for item in items]
    faces = items[0].faces if len(items) == 1 else np.concatenate([item.faces for item in items])
    embeddings, norms = engine.encode_with_norms(faces)
    out, start = [], 0
    for size in sizes:
        out.append((embeddings[start : start + size], norms[start : start + size]))
        start += size
    return out


class BatchStats:
    """Rolling statistics of the batches one replica ran (thread-safe)."""

    BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)

    def __init__(self, window: int = 1000) -> None:
        self._lock = threading.Lock()
        self._recent: deque[tuple[int, int, float, float]] = deque(maxlen=window)
        self.batches = 0
        self.faces = 0
        self.requests = 0
        self.histogram = [0] * (len(self.BUCKETS) + 1)

    def record(self, faces: int, chunks: int, wait_s: float, encode_s: float) -> None:
        with self._lock:
            self.batches += 1
            self.faces += faces
            self.requests += chunks
            self._recent.append((faces, chunks, wait_s, encode_s))
            idx = next((i for i, b in enumerate(self.BUCKETS) if faces <= b), len(self.BUCKETS))
            self.histogram[idx] += 1

    def summary(self) -> dict:
        with self._lock:
            recent = list(self._recent)
            hist = {f"<={b}": c for b, c in zip(self.BUCKETS, self.histogram, strict=False)}
            hist[f">{self.BUCKETS[-1]}"] = self.histogram[-1]
            out = {
                "batches": self.batches,
                "faces": self.faces,
                "chunks": self.requests,
                "mean_batch_faces": self.faces / self.batches if self.batches else 0.0,
                "faces_per_batch_histogram": hist,
            }
        if recent:
            faces = np.array([r[0] for r in recent], float)
            chunks = np.array([r[1] for r in recent], float)
            waits = np.array([r[2] for r in recent]) * 1e3
            encodes = np.array([r[3] for r in recent]) * 1e3
            out["recent"] = {
                "batches": len(recent),
                "mean_batch_faces": float(faces.mean()),
                "max_batch_faces": int(faces.max()),
                "mean_chunks_per_batch": float(chunks.mean()),
                "queue_wait_ms_p50": float(np.percentile(waits, 50)),
                "encode_ms_p50": float(np.percentile(encodes, 50)),
            }
        return out
