"""The embedding deployment: one engine per replica behind HTTP and gRPC.

``EmbeddingDeployment`` is a plain class that ``app.build_app`` turns into a
Serve deployment. On top of the engine it adds: face-counted dynamic batching
(``@serve.batch``, shared by HTTP and gRPC), request decoding, auth, limits,
metrics, and a health check that runs a real encode. It knows nothing about
which backend it holds: ``engines.load_engine`` picks it from the config.

Error handling lives in one place per protocol (``_http_error`` and
``_grpc_error``): every ``RequestError`` becomes a 4xx/503 with its message,
is counted by reason, and leaves the replica serving.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from ray import serve

from engines import load_config, load_engine, load_tom_hanks

from .batching import (
    BatchItem,
    BatchStats,
    count_faces,
    engine_batch_target,
    run_batch,
    split_request,
)
from .codec import (
    NPY_MEDIA_TYPE,
    Limits,
    RequestError,
    decode_embed_json,
    decode_face_spec,
    decode_grpc_faces,
    decode_json_body,
    decode_npy,
    encode_npy,
    is_number,
)
from .metrics import ServiceMetrics
from .protos import embedding_pb2 as pb
from .settings import BatchingConfig, TokenAuth, parse_settings, parse_user_config

logger = logging.getLogger(__name__)

api = FastAPI(
    title="arcface-ray embedding service",
    description="ArcFace embeddings of aligned face crops (or images plus 5-point landmarks).",
    version="1",
)


class EmbeddingDeployment:
    """Engine + batching + decoding + metrics + health; see the module docstring."""

    def __init__(self, args: dict[str, Any] | None = None) -> None:
        self.settings = parse_settings(args)
        overrides = {"embedding.model": self.settings.model, "embedding.backend": self.settings.backend}
        cfg = load_config(self.settings.embedding_config, overrides=overrides)
        self.engine = load_engine(cfg)
        self.engine_info = self.engine.info
        self.limits = Limits(
            max_faces=self.settings.max_faces_per_request,
            max_body_bytes=int(self.settings.max_body_mb * (1 << 20)),
            max_image_pixels=int(self.settings.max_image_megapixels * 1e6),
        )
        self.auth = TokenAuth.from_settings(self.settings)
        self.stats = BatchStats()
        self.metrics = ServiceMetrics(self.engine_info)
        # One encode thread: the engine already uses every core, and keeping the
        # call off the event loop lets requests queue (and batches grow) meanwhile.
        self._encode_pool = ThreadPoolExecutor(1, thread_name_prefix="encode")
        self._decode_pool = ThreadPoolExecutor(self.settings.decode_threads, thread_name_prefix="decode")
        self._pending_faces = 0
        self._default_max_batch, self._default_max_batch_source = engine_batch_target(
            self.engine_info, cfg.embedding.opt_batch_size
        )
        self.batching = BatchingConfig()
        self._apply_batching(self.batching)
        self._health_face = load_tom_hanks()[None]
        logger.info(
            "replica ready: %s / %s / %s, max batch %d faces (%s), auth %s",
            self.engine_info.backend,
            self.engine_info.precision,
            self.engine_info.model_id,
            self._max_batch,
            self._max_batch_source,
            "on" if self.auth.enabled else "off",
        )

    # -- batching -----------------------------------------------------------------------
    def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Live-tune batching (``user_config``) without restarting the replica."""
        self.batching = parse_user_config(user_config)
        self._apply_batching(self.batching)
        logger.info("batching reconfigured: max %d faces (%s), wait %.4f s", self._max_batch,
                    self._max_batch_source, self.batching.batch_wait_timeout_s)

    def _apply_batching(self, batching: BatchingConfig) -> None:
        if batching.max_batch_size is None:
            self._max_batch, self._max_batch_source = self._default_max_batch, self._default_max_batch_source
        else:
            self._max_batch, self._max_batch_source = batching.max_batch_size, "user_config.max_batch_size"
        self._embed_batch.set_max_batch_size(self._max_batch)
        self._embed_batch.set_batch_wait_timeout_s(batching.batch_wait_timeout_s)

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.02, batch_size_fn=count_faces)
    async def _embed_batch(self, items: list[BatchItem]) -> list[tuple[np.ndarray, np.ndarray]]:
        started = time.perf_counter()
        wait_s = started - min(item.enqueued_at for item in items)
        loop = asyncio.get_running_loop()
        results = await loop.run_in_executor(self._encode_pool, run_batch, self.engine, items)
        encode_s = time.perf_counter() - started
        faces = count_faces(items)
        self.stats.record(faces, len(items), wait_s, encode_s)
        self.metrics.batch(faces, wait_s, encode_s)
        return results

    async def embed(self, faces: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Embeddings and norms of ``faces`` through the shared batch queue."""
        n = len(faces)
        if self._pending_faces + n > self.settings.max_pending_faces:
            raise RequestError(
                503,
                "overloaded",
                f"replica queue full ({self._pending_faces} faces pending, limit "
                f"{self.settings.max_pending_faces}); retry later",
            )
        self._pending_faces += n
        try:
            chunks = split_request(faces, self._max_batch)
            parts = await asyncio.gather(*(self._embed_batch(BatchItem(c)) for c in chunks))
        finally:
            self._pending_faces -= n
        if len(parts) == 1:
            return parts[0]
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

    async def check_health(self) -> None:
        """Serve's health probe: a real one-face encode must succeed and be unit-norm."""
        loop = asyncio.get_running_loop()
        emb = await loop.run_in_executor(self._encode_pool, self.engine.encode, self._health_face)
        if emb.shape != (1, self.engine_info.embedding_dim) or not abs(float(np.linalg.norm(emb)) - 1) < 1e-3:
            raise RuntimeError(f"health encode returned {emb.shape} with norm {np.linalg.norm(emb)}")

    # -- shared helpers -------------------------------------------------------------------
    def _response_fields(self) -> dict[str, Any]:
        info = self.engine_info
        return {
            "dim": info.embedding_dim,
            "model": info.model_id,
            "backend": info.backend,
            "precision": info.precision,
            "contract": info.contract,
            "synthetic": info.synthetic,
        }

    async def _decode(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._decode_pool, fn, *args)

    def _http_error(self, err: RequestError) -> JSONResponse:
        self.metrics.reject(err.reason, "http")
        headers = {"WWW-Authenticate": "Bearer"} if err.status == 401 else None
        if err.status == 503:
            headers = {"Retry-After": "1"}
        return JSONResponse(err.to_dict(), status_code=err.status, headers=headers)

    def _check_auth(self, authorization: str | None) -> None:
        if not self.auth.check(authorization):
            raise RequestError(
                401, "unauthorized", "missing or wrong bearer token (Authorization: Bearer ...)"
            )

    async def _read_body(self, request: Request) -> bytes:
        limit = self.limits.max_body_bytes
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limit:
            raise RequestError(
                413, "body_too_large", f"body of {declared} bytes exceeds the {limit}-byte limit"
            )
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise RequestError(413, "body_too_large", f"body exceeds the {limit}-byte limit")
            chunks.append(chunk)
        return b"".join(chunks)

    # -- HTTP -------------------------------------------------------------------------------
    @api.post("/v1/embed")
    async def http_embed(self, request: Request) -> Response:
        """Embed faces: JSON ``{"images": [base64...], "landmarks"?, "aligned"?}`` or an
        ``application/x-npy`` body of ``(N, 112, 112, 3)`` uint8 BGR crops. Answers JSON, or
        ``.npy`` float32 ``(N, D)`` with ``Accept: application/x-npy``."""
        try:
            self._check_auth(request.headers.get("authorization"))
            body = await self._read_body(request)
            ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
            if ctype == NPY_MEDIA_TYPE:
                faces = decode_npy(body, self.limits)
            elif ctype in ("application/json", ""):
                faces = await self._decode(decode_embed_json, decode_json_body(body), self.limits)
            else:
                raise RequestError(
                    415, "unsupported_media_type",
                    f"content-type {ctype!r} not supported; use application/json or {NPY_MEDIA_TYPE}",
                )
            embeddings, norms = await self.embed(faces)
        except RequestError as err:
            return self._http_error(err)
        fields = self._response_fields()
        if NPY_MEDIA_TYPE in request.headers.get("accept", ""):
            headers = {f"x-arcface-{k}": str(v) for k, v in fields.items()}
            return Response(encode_npy(embeddings), media_type=NPY_MEDIA_TYPE, headers=headers)
        return JSONResponse({"embeddings": embeddings.tolist(), "norms": norms.tolist(), **fields})

    @api.post("/v1/compare")
    async def http_compare(self, request: Request) -> Response:
        """Cosine similarity of two faces (``{"image", "landmarks"?}``) or embeddings
        (``{"embedding": [...]}``), and a same-person decision at ``threshold``."""
        try:
            self._check_auth(request.headers.get("authorization"))
            payload = decode_json_body(await self._read_body(request))
            if not isinstance(payload, dict) or "a" not in payload or "b" not in payload:
                raise RequestError(
                    422, "bad_request", "body must be {\"a\": face, \"b\": face, \"threshold\"?}"
                )
            threshold = payload.get("threshold", self.settings.same_person_threshold)
            if not (is_number(threshold) and -1 <= threshold <= 1):  # also refuses NaN
                raise RequestError(
                    422, "bad_request", f"'threshold' must be a number in [-1, 1], got {threshold!r:.40}"
                )
            contract = payload.get("contract")
            if contract is not None and contract != self.engine_info.contract:
                raise RequestError(
                    409, "contract_mismatch",
                    f"embeddings of contract {contract} cannot be compared in this service's space "
                    f"({self.engine_info.contract})",
                )
            sides = [await self._decode(decode_face_spec, payload[k], k, self.limits) for k in ("a", "b")]
            crops = [crop for crop, _ in sides if crop is not None]
            vectors = iter((await self.embed(np.stack(crops)))[0]) if crops else iter(())
            a, b = (vec if vec is not None else next(vectors) for _, vec in sides)
            dim = self.engine_info.embedding_dim
            if a.shape != (dim,) or b.shape != (dim,):
                raise RequestError(
                    422,
                    "bad_embedding",
                    f"embeddings must have {dim} values, got {a.shape[0]} and {b.shape[0]}",
                )
        except RequestError as err:
            return self._http_error(err)
        cosine = float(np.clip(_unit(a) @ _unit(b), -1.0, 1.0))
        return JSONResponse(
            {"cosine": cosine, "same_person": cosine >= float(threshold), "threshold": float(threshold),
             **self._response_fields()}
        )

    @api.get("/v1/info")
    async def http_info(self, request: Request) -> Response:
        """Diagnostics: the engine (backend, model, precision, contract, fallback report),
        the batching settings in force and live batch statistics of this replica."""
        try:
            self._check_auth(request.headers.get("authorization"))
        except RequestError as err:
            return self._http_error(err)
        return JSONResponse(self.describe())

    @api.get("/healthz")
    async def http_health(self) -> dict[str, Any]:
        """Liveness (no auth): the replica is up and holds a started engine."""
        return {"status": "ok", **self._response_fields()}

    def describe(self) -> dict[str, Any]:
        context = serve.get_replica_context()
        return {
            **self.engine_info.to_dict(),
            "service": {
                "replica": context.replica_id.unique_id,
                "pid": os.getpid(),
                "max_batch_size": self._max_batch,
                "max_batch_size_source": self._max_batch_source,
                "batch_wait_timeout_s": self.batching.batch_wait_timeout_s,
                "max_faces_per_request": self.limits.max_faces,
                "max_body_bytes": self.limits.max_body_bytes,
                "max_image_pixels": self.limits.max_image_pixels,
                "max_pending_faces": self.settings.max_pending_faces,
                "pending_faces": self._pending_faces,
                "auth": self.auth.enabled,
            },
            "batch_stats": self.stats.summary(),
        }

    # -- gRPC (method names are the RPC names) ----------------------------------------------
    def _grpc_error(self, err: RequestError, grpc_context) -> None:
        import grpc

        codes = {401: grpc.StatusCode.UNAUTHENTICATED, 413: grpc.StatusCode.RESOURCE_EXHAUSTED,
                 503: grpc.StatusCode.UNAVAILABLE}
        self.metrics.reject(err.reason, "grpc")
        grpc_context.set_code(codes.get(err.status, grpc.StatusCode.INVALID_ARGUMENT))
        grpc_context.set_details(f"{err.reason}: {err.message}")

    def _grpc_auth(self, grpc_context) -> None:
        metadata = dict(grpc_context.invocation_metadata())
        self._check_auth(metadata.get("authorization"))

    def _grpc_response(self, embeddings: np.ndarray, norms: np.ndarray) -> pb.EmbedResponse:
        fields = self._response_fields()
        return pb.EmbedResponse(
            embeddings=[
                pb.Embedding(values=e, norm=float(n)) for e, n in zip(embeddings, norms, strict=True)
            ],
            dim=fields["dim"], model=fields["model"], backend=fields["backend"],
            contract=fields["contract"], precision=fields["precision"],
        )

    async def Embed(self, request: pb.EmbedRequest, grpc_context=None) -> pb.EmbedResponse:
        try:
            self._grpc_auth(grpc_context)
            faces = await self._decode(decode_grpc_faces, [request.face], b"", self.limits)
            return self._grpc_response(*(await self.embed(faces)))
        except RequestError as err:
            self._grpc_error(err, grpc_context)
            return pb.EmbedResponse()

    async def EmbedBatch(self, request: pb.EmbedBatchRequest, grpc_context=None) -> pb.EmbedResponse:
        try:
            self._grpc_auth(grpc_context)
            faces = await self._decode(decode_grpc_faces, list(request.faces), request.crops, self.limits)
            return self._grpc_response(*(await self.embed(faces)))
        except RequestError as err:
            self._grpc_error(err, grpc_context)
            return pb.EmbedResponse()

    async def Health(self, request: pb.HealthRequest, grpc_context=None) -> pb.HealthResponse:
        fields = self._response_fields()
        return pb.HealthResponse(
            status="ok", backend=fields["backend"], model=fields["model"], contract=fields["contract"]
        )


def _unit(vec: np.ndarray) -> np.ndarray:
    """``vec`` at unit norm, in float64 and scaled first: a client's embedding may hold any
    finite floats, whose squares overflow (float32 from 1.9e19, float64 from 1.4e154)."""
    vec = vec.astype(np.float64)
    vec = vec / np.abs(vec).max()
    return vec / np.linalg.norm(vec)


# Serve rewrites the FastAPI routes of the class when `serve.ingress` runs, in
# whichever process runs it; doing it at import time of this module (which owns
# `api`) makes every replica that imports it serve the class-based routes.
EmbeddingIngress = serve.ingress(api)(EmbeddingDeployment)
