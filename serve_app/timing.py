"""Where one request's time went, for its caller: HTTP headers and gRPC trailing metadata.

Like TEI's ``x-queue-time`` / ``x-inference-time``: a caller can tell a busy service (queue)
from a slow engine (compute) without the operator's dashboard. Times are milliseconds with
three decimals; a request cut into several engine batches reports the longest queue wait of
its chunks, the summed engine time of the batches it was in and the faces of its largest one.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

TIMING_HEADERS: dict[str, str] = {
    "x-total-time": "ms from the replica receiving the request to the answer (decode, queue, compute)",
    "x-decode-time": "ms decoding and aligning images (0 for crops and .npy bodies)",
    "x-queue-time": "ms the request waited in the batch queue for the engine",
    "x-compute-time": "ms of engine time of the batches the request's faces ran in",
    "x-batch-faces": "faces in the engine batch the request ran in (the largest, when it was split)",
}


@dataclass
class RequestTiming:
    """Filled in as the request goes (the batch handler adds queue/compute per chunk)."""

    started: float = field(default_factory=time.perf_counter)
    decode_s: float = 0.0
    queue_s: float = 0.0
    compute_s: float = 0.0
    batch_faces: int = 0

    def add_chunk(self, queue_s: float, compute_s: float, batch_faces: int) -> None:
        self.queue_s = max(self.queue_s, queue_s)
        self.compute_s += compute_s
        self.batch_faces = max(self.batch_faces, batch_faces)

    def fields(self) -> dict[str, str]:
        total = time.perf_counter() - self.started
        return {
            "x-total-time": f"{total * 1e3:.3f}",
            "x-decode-time": f"{self.decode_s * 1e3:.3f}",
            "x-queue-time": f"{self.queue_s * 1e3:.3f}",
            "x-compute-time": f"{self.compute_s * 1e3:.3f}",
            "x-batch-faces": str(self.batch_faces),
        }

    def grpc_metadata(self) -> list[tuple[str, str]]:
        """The same fields as gRPC trailing metadata (keys are lowercase ASCII already)."""
        return list(self.fields().items())
