"""GPU (or CPU) stage: a callable class that holds one engine per actor.

Ray Data's actor pool calls it with batches of decoded crops. The engine is
resolved once, in ``__init__``, through the same fallback chain as the online
service, so a GPU node runs TensorRT and a CPU node the CPU fast path, and each
row records which backend embedded it. Rows whose decode failed are passed
through with their reason and error and a zero embedding; only real crops reach the engine.
``fault`` holds test hooks only: fault injection, and a trace of which node embedded what.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

class EmbedActor:
    """``map_batches`` UDF: ``crop`` column in, ``embedding`` / ``norm`` / engine columns out."""

    def __init__(self, config_path: str | None, overrides: dict[str, Any], fault: dict[str, Any]) -> None:
        from engines import load_config, load_engine

        cfg = load_config(config_path, overrides=overrides)
        self.engine = load_engine(cfg)
        info = self.engine.info
        self.dim = info.embedding_dim
        self.meta = {
            "model_id": info.model_id,
            "model_sha256": info.model_sha256,
            "backend": info.backend,
            "precision": info.precision,
            "contract": info.contract,
        }
        self._fault = fault
        self._batches = 0
        self._record = self._record_file(fault.get("record_dir"))
        logger.info("EmbedActor pid %d ready: %s", os.getpid(), self.meta)

    def _maybe_die(self) -> None:
        """Fault injection for tests: die once, mid-job, like a preempted GPU node."""
        after = self._fault.get("kill_after_batches")
        marker = self._fault.get("marker")
        if after is None or not marker or self._batches < after:
            return
        path = Path(marker)
        if path.exists():
            return
        path.write_text(str(os.getpid()))
        logger.warning("fault injection: actor pid %d exits after %d batches", os.getpid(), self._batches)
        os._exit(1)

    @staticmethod
    def _record_file(record_dir: str | None) -> Path | None:
        if not record_dir:
            return None
        Path(record_dir).mkdir(parents=True, exist_ok=True)
        return Path(record_dir) / f"actor-{os.getpid()}.jsonl"

    def _record_batch(self, uids: np.ndarray) -> None:
        """Tracing for tests (``--record-actors-dir``): one JSON line per batch naming this
        actor's Ray node and engine, so a test can see which nodes embedded which rows."""
        import ray

        line = {"node_id": ray.get_runtime_context().get_node_id(), "pid": os.getpid(),
                "backend": self.meta["backend"], "device": self.engine.info.device,
                "uids": [str(u) for u in uids]}
        with self._record.open("a") as fh:
            fh.write(json.dumps(line) + "\n")

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self._maybe_die()
        errors = batch["error"]
        ok = np.array([not e for e in errors], dtype=bool)
        n = len(errors)
        embeddings = np.zeros((n, self.dim), np.float32)
        norms = np.zeros(n, np.float32)
        if ok.any():
            emb, nrm = self.engine.encode_with_norms(batch["crop"][ok])
            embeddings[ok], norms[ok] = emb, nrm
        self._batches += 1
        if self._record is not None:
            self._record_batch(batch["uid"][ok])
        out = {k: batch[k] for k in ("uid", "episode_id", "track_id", "frame", "source", "reason", "error")}
        out.update(embedding=embeddings, norm=norms)
        for key, value in self.meta.items():
            out[key] = np.full(n, value, dtype=object)
        return out
