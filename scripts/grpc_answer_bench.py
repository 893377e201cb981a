"""Cost of one gRPC ``EmbedResponse`` on each side, by answer encoding: a micro-benchmark.

    .venv/bin/python scripts/grpc_answer_bench.py [--faces 256] [--dim 512] [--repeat 5] [--number 20]

For ``--faces`` unit vectors of ``--dim`` floats it times, in one process, what the replica does
(``serve_app.codec.grpc_embed_response`` + ``SerializeToString``) and what a client does
(``FromString`` + ``serve_app.client.decode_embed_response``) for ``packed`` and ``repeated``
answers, plus ``repeated_numpy_rows``: the replica's path before issue 12 (one ``Embedding`` per
numpy row). Best of ``--repeat`` runs of ``--number`` calls, in ms per answer; one JSON line.
It checks that every encoding decodes to the same matrix (exit 1 otherwise).

A tool of the repository (it measures serve_app's codec), not part of the library.
"""

from __future__ import annotations

import argparse
import json
import sys
import timeit

import numpy as np

from engines import cpu_model_name
from serve_app.client import decode_embed_response
from serve_app.codec import grpc_embed_response
from serve_app.protos import embedding_pb2 as pb


def _numpy_rows(embeddings: np.ndarray, norms: np.ndarray, fields: dict) -> pb.EmbedResponse:
    """The pre-issue-12 replica path: a repeated field filled from numpy rows."""
    return pb.EmbedResponse(embeddings=[pb.Embedding(values=e, norm=float(n))
                                        for e, n in zip(embeddings, norms, strict=True)], **fields)


def measure(faces: int, dim: int, repeat: int, number: int) -> dict:
    rng = np.random.default_rng(0)
    embeddings = rng.standard_normal((faces, dim)).astype(np.float32)
    embeddings /= np.linalg.norm(embeddings, axis=1, keepdims=True)
    norms = (rng.random(faces) + 1).astype(np.float32)
    fields = {"dim": dim, "model": "bench", "backend": "none", "contract": "bench", "precision": "fp32"}
    builders = {
        "packed": lambda: grpc_embed_response(embeddings, norms, fields, pb.PACKED),
        "repeated": lambda: grpc_embed_response(embeddings, norms, fields, pb.REPEATED),
        "repeated_numpy_rows": lambda: _numpy_rows(embeddings, norms, fields),
    }
    out: dict = {"faces": faces, "dim": dim, "cpu": cpu_model_name(),
                 "encodings": {}}
    for name, build in builders.items():
        wire = build().SerializeToString()
        got, got_norms = decode_embed_response(pb.EmbedResponse.FromString(wire), faces)
        if not (np.array_equal(got, embeddings) and np.array_equal(got_norms, norms)):
            raise SystemExit(f"{name}: the answer does not decode to the embeddings it was built from")
        serve = min(timeit.repeat(lambda b=build: b().SerializeToString(), number=number, repeat=repeat))
        read = min(timeit.repeat(lambda w=wire: decode_embed_response(pb.EmbedResponse.FromString(w), faces),
                                 number=number, repeat=repeat))
        out["encodings"][name] = {"replica_ms": round(serve / number * 1e3, 3),
                                  "client_ms": round(read / number * 1e3, 3), "bytes": len(wire)}
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--faces", type=int, default=256)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--repeat", type=int, default=5, help="runs; the best is reported")
    p.add_argument("--number", type=int, default=20, help="answers per run")
    args = p.parse_args(argv)
    print(json.dumps(measure(args.faces, args.dim, args.repeat, args.number)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
