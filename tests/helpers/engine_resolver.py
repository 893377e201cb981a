"""A Ray actor resolving a TensorRT engine on a fake GPU node, the way a GPU replica does.

It runs ``engines.tensorrt.plan_cache.get_or_build_plan`` with the configuration the node's
environment gives (``config/embedding.yaml`` + ``ARCFACE_TENSORRT__STORAGE__*``, as
``cluster/aws-gpu.yaml`` and the KubeRay manifests set it), a local cache directory of
its own node (hosts do not share disks), and the GPU facts its node's accelerator label
stands for. The one stand-in is the build step: TensorRT cannot build without a GPU, so
the "plan" is the converted ONNX graph, serialised by ``onnx``, under a header naming
the key: real, deterministic bytes. Every build appends a line to a shared log, which
is what the test counts.

Importable on the cluster's workers: tests/helpers/fake_cluster.py puts tests/helpers/ on their PYTHONPATH.
"""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path
from typing import Any

from fake_cluster import ACCELERATOR_LABEL, ARCHITECTURES

TRT_VERSION = "10.16.0.0"


def plan_bytes(key: str, onnx_path: str) -> bytes:
    """What the build step writes for ``key``: header + the graph it was asked to build."""
    import onnx

    return b"PLAN\0" + key.encode() + b"\0" + onnx.load(onnx_path).SerializeToString()


class EngineResolver:
    def __init__(self, model: str, cache_root: str, build_log: str, build_s: float = 2.0) -> None:
        import ray

        ctx = ray.get_runtime_context()
        self.node_id = ctx.get_node_id()
        self.accelerator = ctx.get_node_labels()[ACCELERATOR_LABEL]
        self.model = model
        self.cache_dir = str(Path(cache_root) / self.node_id)  # this "host's" disk
        self.build_log = build_log
        self.build_s = build_s

    def where(self) -> dict[str, str]:
        return {"node_id": self.node_id, "accelerator": self.accelerator,
                "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES", "")}

    def _build(self, job) -> dict[str, Any]:
        with open(self.build_log, "a") as fh:
            fh.write(f"{self.node_id} {os.getpid()} {job.key}\n")
        data = plan_bytes(job.key, job.onnx_path)
        time.sleep(self.build_s)  # a build takes a while: the other actors must wait, not build
        job.output_path.write_bytes(data)
        return {"builder": "onnx-serialise (test stand-in for TensorRT)"}

    def resolve(self) -> dict[str, Any]:
        from engines import load_config, resolve_model
        from engines.tensorrt.plan_cache import get_or_build_plan
        from engines.tensorrt.plan_key import BuildTarget

        # models are shared (baked into the image, say); engines are per host
        cfg = load_config(overrides={"tensorrt.storage.cache_dir": self.cache_dir})
        cc, gpu_name = ARCHITECTURES[self.accelerator]
        model = resolve_model(self.model, cache_dir=cfg.storage.cache_dir)
        entry = get_or_build_plan(model, cfg.tensorrt, target=BuildTarget(cc, TRT_VERSION, gpu_name),
                                    build=self._build, poll_interval_s=0.2)
        return {**self.where(), "pid": os.getpid(), "key": entry.key, "source": entry.source,
                "sha256": hashlib.sha256(entry.read_verified()).hexdigest(),
                "storage": {"type": cfg.tensorrt.storage.type, "bucket": cfg.tensorrt.storage.bucket}}
