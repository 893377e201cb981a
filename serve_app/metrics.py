"""Prometheus metrics of the service, through Ray's metrics API.

``ray.serve.metrics`` adds the deployment / replica / application tags; Ray
exports everything on each node's metrics port (``--metrics-export-port``;
KubeRay: 8080). Serve's own batching metrics (``ray_serve_actual_batch_size``
counts *requests*) are complemented here by sizes counted in *faces*.
"""

from __future__ import annotations

from engines import EngineInfo

BATCH_FACES_BUCKETS = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512]
MS_BUCKETS = [0.5, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000]


class ServiceMetrics:
    """The service's counters and histograms; created inside the replica."""

    def __init__(self, info: EngineInfo) -> None:
        from ray.serve import metrics

        self.faces = metrics.Counter(
            "arcface_faces_embedded", "Faces embedded.", tag_keys=("backend",)
        )
        self.batch_faces = metrics.Histogram(
            "arcface_batch_size_faces",
            "Faces per engine batch (Serve's own batch-size metric counts requests).",
            boundaries=BATCH_FACES_BUCKETS,
            tag_keys=("backend",),
        )
        self.queue_wait = metrics.Histogram(
            "arcface_queue_wait_ms",
            "Time the oldest request of a batch waited in the batch queue.",
            boundaries=MS_BUCKETS,
            tag_keys=("backend",),
        )
        self.encode = metrics.Histogram(
            "arcface_encode_ms", "Engine time per batch.", boundaries=MS_BUCKETS, tag_keys=("backend",)
        )
        self.backend = metrics.Gauge(
            "arcface_backend_info",
            "1 for the backend / precision / contract this replica serves with.",
            tag_keys=("backend", "precision", "model", "contract"),
        )
        self.rejected = metrics.Counter(
            "arcface_rejected_requests",
            "Requests refused, by reason (bad input, auth, overload).",
            tag_keys=("reason", "protocol"),
        )
        self._tags = {"backend": info.backend}
        self.backend.set(
            1,
            tags={
                "backend": info.backend,
                "precision": info.precision,
                "model": info.model_id,
                "contract": info.contract,
            },
        )

    def batch(self, faces: int, wait_s: float, encode_s: float) -> None:
        self.faces.inc(faces, tags=self._tags)
        self.batch_faces.observe(faces, tags=self._tags)
        self.queue_wait.observe(wait_s * 1e3, tags=self._tags)
        self.encode.observe(encode_s * 1e3, tags=self._tags)

    def reject(self, reason: str, protocol: str) -> None:
        self.rejected.inc(1, tags={"reason": reason, "protocol": protocol})
