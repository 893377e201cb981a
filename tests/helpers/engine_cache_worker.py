"""One simulated GPU host resolving an engine: run as ``python engine_cache_worker.py '<json>'``.

Each process has its own local cache dir (its own "host") or shares one with
another process (two processes on one host); all share one S3 bucket. The
build step writes known bytes, appends to a shared log so the test can count
builds, and can crash the process mid-build (``os._exit``) to leave a stale lock.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from pathlib import Path

TARGET = {"compute_capability": (8, 9), "trt_version": "10.16.0.0", "gpu_name": "simulated L4",
          "trt_cuda_major": 12}


def known_plan_bytes(key: str) -> bytes:
    """What the test build step writes for ``key``: deterministic, key-specific, 64 KiB+."""
    return b"PLAN\0" + key.encode() + b"\0" + bytes(range(256)) * 256


def main(args: dict) -> None:
    from engines.config import StorageConfig, TensorRTConfig
    from engines.models import resolve_model
    from engines.tensorrt.plan_cache import get_or_build_plan
    from engines.tensorrt.plan_key import BuildTarget

    model = resolve_model(args["model_path"])
    cfg = TensorRTConfig(
        precision="fp32", lock_ttl_s=args.get("ttl", 60.0), wait_timeout_s=args.get("wait", 90.0),
        storage=StorageConfig(type="s3", bucket=args["bucket"], prefix="engines",
                              cache_dir=args["cache_dir"], endpoint_url=args["endpoint"]),
    )

    def build(job):
        with open(args["log"], "a") as fh:
            fh.write(f"{args['name']} {os.getpid()}\n")
        if args.get("crash"):
            os._exit(3)  # dies holding the S3 lock: no release, no heartbeat
        time.sleep(args.get("build_s", 1.0))
        job.output_path.write_bytes(known_plan_bytes(job.key))

    Path(args["ready"]).touch()
    while not Path(args["go"]).exists():
        time.sleep(0.01)
    target = BuildTarget(tuple(TARGET["compute_capability"]), TARGET["trt_version"], TARGET["gpu_name"],
                         TARGET["trt_cuda_major"])
    entry = get_or_build_plan(model, cfg, target=target, build=build, poll_interval_s=0.1)
    data = entry.read_verified()
    print(json.dumps({"name": args["name"], "source": entry.source, "key": entry.key,
                      "sha256": hashlib.sha256(data).hexdigest()}))


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
