"""The online part of ``arcface demo``: start the service locally, embed real images over
HTTP and gRPC, check them against the in-process engine, shut down cleanly."""

from __future__ import annotations

import base64
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


def demo_step(cfg, model, workdir) -> dict[str, Any]:
    import cv2
    import grpc
    import requests

    from engines import get_engine, source_faces

    from . import launch
    from .protos import embedding_pb2 as pb
    from .protos import embedding_pb2_grpc as pb_grpc

    print("\n== 5. online service: Ray Serve, HTTP + gRPC ==", flush=True)
    config = launch.load_serve_config(
        http_port=_free_port(), grpc_port=_free_port(), http_host="127.0.0.1",
        app_args={"embedding_config": cfg.source if cfg.source != "<defaults>" else None,
                  "model": cfg.embedding.model},
    )
    started = time.perf_counter()
    endpoints = launch.start(config, log_to_driver=False)
    print(f"started in {time.perf_counter() - started:.1f} s: HTTP {endpoints.http}, gRPC {endpoints.grpc}")
    token = os.environ.get("ARCFACE_SERVE_TOKEN")
    headers = {"authorization": f"Bearer {token}"} if token else {}
    result: dict[str, Any] = {"name": "serve", "http": endpoints.http, "grpc": endpoints.grpc}
    try:
        faces = source_faces()
        group = [f for f in faces if f.image_file == "t1.jpg"]
        # PNG: lossless, so the server sees exactly the pixels the in-process check uses
        group_png = base64.b64encode(cv2.imencode(".png", group[0].image)[1].tobytes()).decode()
        body = {
            "images": [group_png] * len(group),
            "landmarks": [f.landmarks.tolist() for f in group],
        }
        resp = requests.post(endpoints.http + "/v1/embed", json=body, headers=headers, timeout=120)
        resp.raise_for_status()
        served = np.asarray(resp.json()["embeddings"], np.float32)
        info = requests.get(endpoints.http + "/v1/info", headers=headers, timeout=30).json()
        print(f"POST /v1/embed: {len(group)} faces of t1.jpg aligned on the server by landmarks -> "
              f"{served.shape}, backend {info['backend']}/{info['precision']}, contract {info['contract']}")
        direct = get_engine(info["backend"], info["model_ref"], precision=info["precision"]).encode(
            np.stack([f.crop for f in group])
        )
        cosine = (served * direct).sum(1)
        print(f"served vs in-process engine: min cosine {cosine.min():.6f}")
        channel = grpc.insecure_channel(endpoints.grpc)
        stub = pb_grpc.EmbeddingServiceStub(channel)
        metadata = [("application", endpoints.applications[0])]
        if token:
            metadata.append(("authorization", f"Bearer {token}"))
        tom = faces[-1].crop
        reply = stub.Embed(pb.EmbedRequest(face=pb.Face(crop=tom.tobytes())), metadata=metadata, timeout=60)
        channel.close()
        print(f"gRPC Embed (Tom Hanks crop): dim {reply.dim}, norm before L2 {reply.embeddings[0].norm:.1f}")
        stats = info["batch_stats"]
        print(f"replica batch stats: {stats['batches']} batches, {stats['faces']} faces")
        result.update(ok=bool(cosine.min() >= 0.99999), min_cosine_vs_engine=float(cosine.min()),
                      backend=info["backend"], contract=info["contract"])
    finally:
        launch.stop()
        print("service stopped", flush=True)
    return result


STEP = DemoStep("serve", 5, "skip the online service step", demo_step)
