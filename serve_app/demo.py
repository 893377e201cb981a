"""The online part of ``arcface demo``: start the service locally, embed real images over
HTTP and gRPC, check them against the in-process engine, shut down cleanly."""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import numpy as np

from engines import DemoStep

logger = logging.getLogger(__name__)


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def demo_step(cfg, model, workdir, verbose: bool = False) -> dict[str, Any]:
    import cv2
    import ray.serve  # noqa: F401  (configures Ray's and Serve's loggers, which quiet_console then quiets)

    from engines import get_engine, quiet_console, source_faces

    from . import launch
    from .client import EmbeddingClient, GrpcEmbeddingClient

    print("\n== 5. online service: Ray Serve, HTTP + gRPC ==", flush=True)
    if not verbose:
        quiet_console("ray")
    config = launch.load_serve_config(
        http_port=_free_port(), grpc_port=_free_port(), http_host="127.0.0.1",
        app_args={"embedding_config": cfg.source if cfg.source != "<defaults>" else None,
                  "model": cfg.embedding.model},
    )
    started = time.perf_counter()
    endpoints = launch.start(config, log_to_driver=False)
    print(f"started in {time.perf_counter() - started:.1f} s: HTTP {endpoints.http}, gRPC {endpoints.grpc}")
    token = os.environ.get("ARCFACE_SERVE_TOKEN")
    result: dict[str, Any] = {"name": "serve", "http": endpoints.http, "grpc": endpoints.grpc}
    try:
        faces = source_faces()
        group = [f for f in faces if f.image_file == "t1.jpg"]
        # PNG: lossless, so the server sees exactly the pixels the in-process check uses
        group_png = cv2.imencode(".png", group[0].image)[1].tobytes()
        with EmbeddingClient(endpoints.http, token=token) as client:
            info = client.info()
            served, _, contract = client.embed_images([group_png] * len(group),
                                                      landmarks=[f.landmarks for f in group])
            timing = client.last_timing
            crops = np.stack([f.crop for f in faces])
            by_npy = client.embed(crops).embeddings  # .npy transport, the client's default
        print(f"POST /v1/embed: {len(group)} faces of t1.jpg aligned on the server by landmarks -> "
              f"{served.shape}, backend {info['backend']}/{info['precision']}, contract {contract}; "
              f"queue {timing.get('x-queue-time', 0):.1f} ms, "
              f"compute {timing.get('x-compute-time', 0):.1f} ms")
        direct = get_engine(info["backend"], info["model_ref"], precision=info["precision"])
        cosine = (served * direct.encode(np.stack([f.crop for f in group]))).sum(1)
        npy_cosine = (by_npy * direct.encode(crops)).sum(1)
        print(f"served vs in-process engine: min cosine {cosine.min():.6f} (images + landmarks), "
              f"{npy_cosine.min():.6f} ({len(crops)} crops as .npy)")
        with GrpcEmbeddingClient(endpoints.grpc, application=endpoints.applications[0], token=token,
                                 expected_contract=contract) as grpc_client:
            reply = grpc_client.embed(faces[-1].crop[None])
        print(f"gRPC EmbedBatch (Tom Hanks crop): dim {reply.embeddings.shape[1]}, "
              f"norm before L2 {reply.norms[0]:.1f}")
        with EmbeddingClient(endpoints.http, token=token) as client:
            stats = client.info()["batch_stats"]
        print(f"replica batch stats: {stats['batches']} batches, {stats['faces']} faces")
        worst = float(min(cosine.min(), npy_cosine.min()))
        result.update(ok=bool(worst >= 0.99999), min_cosine_vs_engine=worst,
                      backend=info["backend"], contract=contract)
    finally:
        launch.stop(shutdown_ray=False)  # the demo's later steps reuse this Ray (shut down at exit)
        print("service stopped", flush=True)
    return result


STEP = DemoStep("serve", 5, "skip the online service step", demo_step)
