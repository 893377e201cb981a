"""The identify part of ``arcface demo``: a sample gallery (enrolled, threshold calibrated), the
service started with it, and 1:N identify over HTTP for held-out faces and one not enrolled."""

from __future__ import annotations

import base64
import os
from typing import Any

from engines import DemoStep


def demo_step(cfg, model, workdir, verbose: bool = False) -> dict[str, Any]:
    import ray.serve  # noqa: F401  (configures Ray's and Serve's loggers, which quiet_console then quiets)
    import requests

    from engines import get_engine, make_sample_gallery, quiet_console, sample_jitters, source_faces

    from . import launch
    from .demo import _free_port

    print("\n== 7. gallery and 1:N identify over HTTP ==", flush=True)
    if not verbose:
        quiet_console("ray")
    engine = get_engine(cfg.embedding.backend, cfg.embedding.model, config=cfg)
    sample = make_sample_gallery(engine, workdir / "gallery")
    print(f"gallery enroll: {len(sample.enrolled)} identities ({', '.join(sample.enrolled)}) into "
          f"{sample.uri}; {sample.stranger} left out")
    print(f"gallery calibrate: threshold {sample.threshold:.3f} at FAR <= 1e-2 on other jitters "
          f"(synthetic weights identify nobody: real thresholds come from your data)")
    config = launch.load_serve_config(
        http_port=_free_port(), grpc_port=_free_port(), http_host="127.0.0.1",
        app_args={"embedding_config": cfg.source if cfg.source != "<defaults>" else None,
                  "model": cfg.embedding.model, "gallery": sample.uri},
    )
    endpoints = launch.start(config, log_to_driver=False)
    token = os.environ.get("ARCFACE_SERVE_TOKEN")
    headers = {"authorization": f"Bearer {token}"} if token else {}
    try:
        faces = source_faces()
        probes = [sample_jitters(i, 1, seed=3000 + i)[0] for i in range(len(faces))]
        body = {"crops": [base64.b64encode(p.tobytes()).decode() for p in probes],
                "threshold": sample.threshold, "top_k": 2}
        resp = requests.post(endpoints.http + "/v1/identify", json=body, headers=headers, timeout=120)
        resp.raise_for_status()
        results = resp.json()["results"]
    finally:
        launch.stop(shutdown_ray=False)  # the demo's later steps reuse this Ray (shut down at exit)
    expected = [f.name if f.name in sample.enrolled else "unknown" for f in faces]
    print(f"POST /v1/identify: {len(probes)} held-out jittered faces")
    print(f"{'face':<12} {'answer':<12} {'cosine':>7}  runner-up")
    for face, r in zip(faces, results, strict=True):
        runner = r["candidates"][1] if len(r["candidates"]) > 1 else {"identity": "-", "score": 0.0}
        print(f"{face.name:<12} {r['identity']:<12} {r['score']:>7.3f}  {runner['identity']} "
              f"{runner['score']:.3f}")
    ok = [r["identity"] for r in results] == expected
    return {"name": "identify", "ok": ok, "gallery": sample.uri, "threshold": sample.threshold}


STEP = DemoStep("identify", 7, "skip the gallery / identify step", demo_step)
