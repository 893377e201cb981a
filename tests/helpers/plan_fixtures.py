"""What the plan-cache tests share: the simulated build target, the test build step, a config.

The build step is the plan cache's one seam (TensorRT cannot build on a CPU host): it
writes known bytes for the key instead of running the builder.
"""

from __future__ import annotations

from pathlib import Path

from engine_cache_worker import TARGET as WORKER_TARGET
from engine_cache_worker import known_plan_bytes

from engines.config import StorageConfig, TensorRTConfig
from engines.tensorrt.plan_key import BuildTarget

TARGET = BuildTarget(tuple(WORKER_TARGET["compute_capability"]), WORKER_TARGET["trt_version"],
                     WORKER_TARGET["gpu_name"], WORKER_TARGET["trt_cuda_major"])


class CountingBuild:
    """The test build step: writes the known bytes for the key and counts its calls.

    ``numbered``: each build appends ``build N`` to the bytes, so copies can be told apart.
    """

    def __init__(self, numbered: bool = False) -> None:
        self.keys: list[str] = []
        self.numbered = numbered

    def __call__(self, job) -> dict:
        self.keys.append(job.key)
        suffix = f"build {len(self.keys)}".encode() if self.numbered else b""
        job.output_path.write_bytes(known_plan_bytes(job.key) + suffix)
        return {"builder": "test"}


def build_number(data: bytes) -> int:
    """Which build of a numbered ``CountingBuild`` wrote ``data``."""
    return int(data.rsplit(b"build ", 1)[1])


def trt_config(tmp_path: Path, name: str = "host", endpoint: str | None = None, bucket: str | None = None,
               **kw) -> TensorRTConfig:
    storage = StorageConfig(type="s3" if bucket else "local", bucket=bucket, prefix="engines",
                            cache_dir=str(tmp_path / name), endpoint_url=endpoint)
    return TensorRTConfig(precision="fp32", storage=storage, **kw)
