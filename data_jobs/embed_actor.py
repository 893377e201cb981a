"""GPU (or CPU) stage: a callable class that holds one engine per actor.

Ray Data's actor pool calls it with batches of decoded crops. The engine is
resolved once, in ``__init__``, through the same fallback chain as the online
service, so a GPU node runs TensorRT and a CPU node the CPU fast path, and each
row records which backend embedded it. Rows whose decode failed are passed
through with their reason and error and a zero embedding; only real crops reach the engine.
Batches are Arrow tables: the crops reach the engine as the uint8 array the decode stage
built (no copy when every row decoded, which is the common case), the vectors leave as a
``fixed_size_list`` over the engine's own output buffer, and every other column (ids,
pass-through) is passed on untouched.
With ``placement_log_dir`` (``episodes.placement_log_dir``) each actor appends a JSON line per
batch naming its Ray node and the rows it embedded: an audit of where a cluster placed the work.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .staging import embedding_array

logger = logging.getLogger(__name__)


class EmbedActor:
    """``map_batches`` UDF: ``crop`` column in, ``embedding`` / ``norm`` / engine columns out."""

    def __init__(self, config_path: str | None, overrides: dict[str, Any],
                 placement_log_dir: str | None = None) -> None:
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
        self._placement = self._placement_file(placement_log_dir)
        logger.info("EmbedActor pid %d ready: %s", os.getpid(), self.meta)

    @staticmethod
    def _placement_file(log_dir: str | None) -> Path | None:
        if not log_dir:
            return None
        Path(log_dir).mkdir(parents=True, exist_ok=True)
        return Path(log_dir) / f"actor-{os.getpid()}.jsonl"

    def _log_placement(self, uids: np.ndarray) -> None:
        """One JSON line per batch naming this actor's Ray node, the resources Ray reserved for it
        there (``accelerator_type:A10G``, ``GPU``: the node's kind, known even after an
        autoscaler has removed the node) and its engine: which nodes of a cluster embedded which
        rows (``episodes.placement_log_dir``)."""
        import ray

        context = ray.get_runtime_context()
        line = {"node_id": context.get_node_id(), "pid": os.getpid(),
                "resources": context.get_assigned_resources(),
                "backend": self.meta["backend"], "device": self.engine.info.device,
                "uids": [str(u) for u in uids]}
        with self._placement.open("a") as fh:
            fh.write(json.dumps(line) + "\n")

    def __call__(self, batch: pa.Table) -> pa.Table:
        n = batch.num_rows
        ok = pc.equal(batch["error"], "").to_numpy(zero_copy_only=False)
        crops = _crops(batch["crop"])
        if ok.all():
            embeddings, norms = self.engine.encode_with_norms(crops)
        else:
            embeddings, norms = np.zeros((n, self.dim), np.float32), np.zeros(n, np.float32)
            if ok.any():
                embeddings[ok], norms[ok] = self.engine.encode_with_norms(crops[ok])
        if self._placement is not None:
            self._log_placement(batch["uid"].filter(pa.array(ok)).to_numpy(zero_copy_only=False))
        out = batch.drop_columns(["crop"])
        out = out.append_column("embedding", embedding_array(embeddings, self.dim))
        out = out.append_column("norm", pa.array(np.ascontiguousarray(norms, np.float32)))
        for key, value in self.meta.items():
            out = out.append_column(key, pa.array([value] * n, pa.string()))
        return out


def _crops(column: pa.ChunkedArray) -> np.ndarray:
    """The (N, 112, 112, 3) uint8 crops of Ray's tensor column: a view of one chunk, or one
    concatenation where Ray joined several decode blocks into this batch."""
    chunks = [chunk.to_numpy() for chunk in column.chunks]
    return chunks[0] if len(chunks) == 1 else np.concatenate(chunks)
