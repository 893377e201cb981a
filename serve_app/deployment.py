"""The embedding deployment: one engine per replica behind HTTP and gRPC.

``EmbeddingDeployment`` is a plain class that ``app.build_app`` turns into a
Serve deployment. On top of the engine it adds: face-counted dynamic batching
(``@serve.batch``, shared by HTTP and gRPC), request decoding on a fair decode
queue (``decode_queue``), admission bounded in faces and in time (``admission``),
auth, limits, metrics, and a health check that runs a real encode. It knows
nothing about which backend it holds: ``engines.load_engine`` picks it from the config.

Routes and RPCs raise ``RequestError``; ``errors`` turns it (and anything else that
escapes) into a response in one place per protocol: ``install_http_handlers`` for
HTTP, the ``grpc_method`` decorator for gRPC. Every refusal is counted by reason
and leaves the replica serving.
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
from fastapi.responses import Response
from ray import serve

from engines import FACE_SIZE, load_config, load_engine, load_tom_hanks, search

from . import tracing
from .admission import Admission
from .answers import embed_answer, json_response, requested_encoding
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
    FaceJob,
    Limits,
    check_grpc_encoding,
    decode_json_body,
    decode_npy,
    grpc_embed_response,
    is_number,
    plan_embed_json,
    plan_face_spec,
    plan_grpc_faces,
)
from .decode_queue import FairDecodeQueue
from .errors import ErrorReporter, RequestError, bind_reporter, grpc_method, install_http_handlers
from .identify import GalleryHolder, identify_params, split_identify_payload
from .metrics import ServiceMetrics
from .multipart import plan_multipart
from .origin import check_same_origin
from .protos import embedding_pb2 as pb
from .schemas import MULTIPART, install_openapi
from .settings import BatchingConfig, TokenAuth, parse_settings, parse_user_config
from .timing import RequestTiming

logger = logging.getLogger(__name__)

api = FastAPI(
    title="arcface-ray embedding service",
    description="ArcFace embeddings of aligned face crops (or images plus 5-point landmarks).",
    version="1",
)
install_http_handlers(api)
install_openapi(api)  # request/answer schemas of the raw-Request routes: schemas.ROUTES

_JSON = "application/json"


class EmbeddingDeployment:
    """Engine + batching + decoding + admission + metrics + health; see the module docstring."""

    def __init__(self, args: dict[str, Any] | None = None) -> None:
        self.settings = parse_settings(args)
        self.auth = TokenAuth.from_settings(self.settings)  # before the engine: fail fast
        overrides = {"embedding.model": self.settings.model, "embedding.backend": self.settings.backend}
        cfg = load_config(self.settings.embedding_config, overrides=overrides)
        self.engine = load_engine(cfg)
        self.engine_info = self.engine.info
        self.limits = Limits(
            max_faces=self.settings.max_faces_per_request,
            max_body_bytes=int(self.settings.max_body_mb * (1 << 20)),
            max_image_pixels=int(self.settings.max_image_megapixels * 1e6),
            max_request_pixels=int(self.settings.max_request_megapixels * 1e6),
        )
        self.stats = BatchStats()
        self.metrics = ServiceMetrics(self.engine_info)
        self.errors = ErrorReporter(self.metrics, self.settings.retry_after_s)
        bind_reporter(self.errors)  # the HTTP handlers count refusals with it
        self.admission = Admission(self.settings.max_pending_faces, self.settings.max_queue_wait_s)
        # One encode thread: the engine already uses every core, and keeping the
        # call off the event loop lets requests queue (and batches grow) meanwhile.
        self._encode_pool = ThreadPoolExecutor(1, thread_name_prefix="encode")
        self._decoder = FairDecodeQueue(self.settings.decode_threads, self.settings.max_queue_wait_s)
        self._default_max_batch, self._default_max_batch_source = engine_batch_target(
            self.engine_info, cfg.embedding.opt_batch_size
        )
        self.batching = BatchingConfig()
        self._apply_batching(self.batching)
        self.identity = cfg.identity
        self.gallery = GalleryHolder(self.settings.gallery or cfg.identity.gallery,
                                     self.engine_info.contract, self.engine_info.embedding_dim, cfg.storage,
                                     self.batching.gallery_reload)
        self._health_face = load_tom_hanks()[None]
        self.admission.floor_faces_per_s = self._full_batch_rate()
        logger.info(
            "replica ready: %s / %s / %s, max batch %d faces (%s), auth %s",
            self.engine_info.backend,
            self.engine_info.precision,
            self.engine_info.model_id,
            self._max_batch,
            self._max_batch_source,
            "on" if self.auth.enabled else "off",
        )

    def _full_batch_rate(self) -> float:
        """Faces/s of one full batch (the engine's optimal one), timed after a warm-up call: the
        floor of admission's throughput estimate, so that a fresh or long-quiet replica, whose
        recent batches are small and slow per face, does not refuse a burst it would serve well
        within ``max_queue_wait_s``."""
        batch = np.repeat(self._health_face, self._default_max_batch, axis=0)
        self.engine.encode(self._health_face)
        started = time.perf_counter()
        self.engine.encode(batch)
        return len(batch) / max(time.perf_counter() - started, 1e-6)

    # -- batching -----------------------------------------------------------------------
    def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Live-tune batching (``user_config``) without restarting the replica."""
        self.batching = parse_user_config(user_config)
        self._apply_batching(self.batching)
        self.gallery.reconfigure(self.batching.gallery_reload)
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
    async def _embed_batch(self, items: list[BatchItem]) -> list[tuple[np.ndarray, np.ndarray] | None]:
        """One engine call for the chunks whose request is still within its wait; ``None`` for
        chunks dropped because their request waited past ``max_queue_wait_s``."""
        started = time.perf_counter()
        keep = self.admission.start_batch([item.ticket for item in items])
        tracing.record_queue(items, keep, tracing.now_ns())
        live = [item for item, k in zip(items, keep, strict=True) if k]
        if not live:
            return [None] * len(items)
        wait_s = started - min(item.enqueued_at for item in live)
        faces = count_faces(live)
        loop = asyncio.get_running_loop()
        with tracing.encode_span(live, faces):
            results = iter(await loop.run_in_executor(self._encode_pool, run_batch, self.engine, live))
        encode_s = time.perf_counter() - started
        self.admission.finish_batch(faces, encode_s)
        self.stats.record(faces, len(live), wait_s, encode_s)
        self.metrics.batch(faces, wait_s, encode_s)
        for item in live:
            if item.timing is not None:
                item.timing.add_chunk(started - item.enqueued_at, encode_s, faces)
        return [next(results) if k else None for k in keep]

    async def embed(self, faces: np.ndarray,
                    timing: RequestTiming | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Embeddings and norms of ``faces`` through the shared batch queue (admission first:
        503 at once when the replica cannot start it within ``max_queue_wait_s``); ``timing``
        gets the queue wait and engine time of its chunks."""
        ticket = self.admission.admit(len(faces))
        try:
            chunks = split_request(faces, self._max_batch)
            context = tracing.current_context()
            parts = await asyncio.gather(*(self._embed_batch(BatchItem(c, ticket, timing=timing,
                                                                       trace_context=context))
                                           for c in chunks))
        finally:
            self.admission.release(ticket)
        if any(part is None for part in parts):
            raise self.admission.expired_error(ticket)
        if len(parts) == 1:
            return parts[0]
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

    async def _crops(self, jobs: list[FaceJob], timing: RequestTiming | None = None) -> np.ndarray:
        """The crops of ``jobs``: images decoded on the fair decode queue, ready crops as they are."""
        todo = [job for job in jobs if job.crop is None]
        started = time.perf_counter()
        with tracing.decode_span(len(todo)):
            decoded = iter(await self._decoder.run([job.run for job in todo]))
        if timing is not None and todo:
            timing.decode_s += time.perf_counter() - started
        out = np.empty((len(jobs), FACE_SIZE, FACE_SIZE, 3), np.uint8)
        for i, job in enumerate(jobs):
            out[i] = job.crop if job.crop is not None else next(decoded)
        return out

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

    def _check_auth(self, authorization: str | None) -> None:
        if not self.auth.check(authorization):
            raise RequestError(
                401, "unauthorized", "missing or wrong bearer token (Authorization: Bearer ...)"
            )

    @staticmethod
    def _content_type(request: Request, allowed: tuple[str, ...]) -> str:
        """The declared media type, required (a POST without one is refused, not guessed: a
        cross-site form can send none or text/plain without a CORS preflight)."""
        raw = request.headers.get("content-type")
        ctype = (raw or "").split(";")[0].strip().lower()
        if ctype not in allowed:
            got = f"content-type {ctype!r}" if raw else "no content-type"
            raise RequestError(415, "unsupported_media_type",
                               f"{got}; send {' or '.join(allowed)}")
        return ctype

    async def _read_body(self, request: Request) -> bytes:
        limit = self.limits.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None and not (declared.isascii() and declared.isdigit()):
            raise RequestError(400, "bad_request", f"content-length {declared!r:.40} is not a number")
        if declared and int(declared) > limit:
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

    async def _json_plan(self, body: bytes, plan):
        """Parse a JSON body and plan its faces on the decode queue (a 16 MB body takes a
        while to parse: not on the event loop that forms batches)."""
        return (await self._decoder.run([lambda: plan(decode_json_body(body))]))[0]

    # -- HTTP -------------------------------------------------------------------------------
    @api.post("/v1/embed")
    async def http_embed(self, request: Request) -> Response:
        """Embed faces: JSON ``{"images": [base64...], "landmarks"?, "aligned"?}`` or
        ``{"crops": [base64 of raw 112x112x3 BGR...]}``, or an ``application/x-npy`` body of
        ``(N, 112, 112, 3)`` uint8 BGR crops, or ``multipart/form-data`` image files (``multipart``).
        Answers JSON (``?encoding=json`` lists of numbers or ``base64`` float32), or ``.npy``
        float32 ``(N, D)`` with ``Accept: application/x-npy`` (``answers``); timing
        headers either way (``timing``). Bodies and answers: ``schemas.ROUTES``."""
        timing = RequestTiming()
        self._check_auth(request.headers.get("authorization"))
        ctype = self._content_type(request, (_JSON, NPY_MEDIA_TYPE, MULTIPART))
        check_same_origin(request.headers, self.settings.allowed_hosts)
        encoding = requested_encoding(request.query_params)
        self.admission.check_open()
        body = await self._read_body(request)
        if ctype == NPY_MEDIA_TYPE:
            faces = decode_npy(body, self.limits)
        elif ctype == MULTIPART:
            plan = await plan_multipart(body, request.headers["content-type"], self.limits)
            faces = await self._crops(plan, timing)
        else:
            plan = await self._json_plan(body, lambda p: plan_embed_json(p, self.limits))
            faces = await self._crops(plan, timing)
        embeddings, norms = await self.embed(faces, timing)
        return embed_answer(embeddings, norms, self._response_fields(), timing.fields(),
                            request.headers.get("accept", ""), encoding)

    @api.post("/v1/compare")
    async def http_compare(self, request: Request) -> Response:
        """Cosine similarity of two faces (``{"image", "landmarks"?}`` or ``{"crop"}``) or
        embeddings (``{"embedding": [...]}``), and a same-person decision at ``threshold``."""
        timing = RequestTiming()
        self._check_auth(request.headers.get("authorization"))
        self._content_type(request, (_JSON,))
        check_same_origin(request.headers, self.settings.allowed_hosts)
        self.admission.check_open()
        body = await self._read_body(request)
        threshold, sides = await self._json_plan(body, self._plan_compare)
        jobs = [job for job, _ in sides if job is not None]
        vectors = iter((await self.embed(await self._crops(jobs, timing), timing))[0]) if jobs else iter(())
        a, b = (vec if vec is not None else next(vectors) for _, vec in sides)
        dim = self.engine_info.embedding_dim
        if a.shape != (dim,) or b.shape != (dim,):
            raise RequestError(
                422,
                "bad_embedding",
                f"embeddings must have {dim} values, got {a.shape[0]} and {b.shape[0]}",
            )
        cosine = float(np.clip(_unit(a) @ _unit(b), -1.0, 1.0))
        return json_response(
            {"cosine": cosine, "same_person": cosine >= float(threshold), "threshold": float(threshold),
             **self._response_fields()}, headers=timing.fields()
        )

    def _plan_compare(self, payload: Any):
        if not isinstance(payload, dict) or "a" not in payload or "b" not in payload:
            raise RequestError(
                422, "bad_request", "body must be {\"a\": face, \"b\": face, \"threshold\"?}"
            )
        unknown = sorted(set(payload) - {"a", "b", "threshold", "contract"})
        if unknown:
            raise RequestError(422, "bad_request", f"unknown field(s) {unknown}; expected a, b, threshold, "
                                                   "contract")
        threshold = payload.get("threshold", self.settings.same_person_threshold)
        if not (is_number(threshold) and -1 <= threshold <= 1):  # also refuses NaN
            raise RequestError(
                422, "bad_request", f"'threshold' must be a number in [-1, 1], got {threshold!r:.40}"
            )
        contract = payload.get("contract")
        if contract is not None and not isinstance(contract, str):
            raise RequestError(422, "bad_request",
                               f"'contract' must be a string, got {type(contract).__name__}")
        if contract is not None and contract != self.engine_info.contract:
            raise RequestError(
                409, "contract_mismatch",
                f"embeddings of contract {contract!r:.80} cannot be compared in this service's space "
                f"({self.engine_info.contract})",
            )
        sides = [plan_face_spec(payload[k], k, self.limits) for k in ("a", "b")]
        total = sum(job.pixels for job, _ in sides if job is not None)
        if total > self.limits.max_request_pixels:
            raise RequestError(413, "request_too_large",
                               f"the two images declare {total:,} pixels, more than the "
                               f"{self.limits.max_request_pixels:,} decoded per request "
                               "(max_request_megapixels)")
        return threshold, sides

    @api.post("/v1/identify")
    async def http_identify(self, request: Request) -> Response:
        """1:N: the faces of an embed JSON body (``images``/``landmarks``/``aligned`` or ``crops``),
        plus ``top_k`` and ``threshold`` (defaults: ``identity.*`` of the config); for each face
        the top-k gallery identities by cosine and the decision (``identity`` or ``unknown``)."""
        timing = RequestTiming()
        self._check_auth(request.headers.get("authorization"))
        self._content_type(request, (_JSON,))
        check_same_origin(request.headers, self.settings.allowed_hosts)
        self.admission.check_open()
        gallery = self.gallery.current()
        body = await self._read_body(request)
        (top_k, threshold), jobs = await self._json_plan(body, self._plan_identify)
        embeddings, _ = await self.embed(await self._crops(jobs, timing), timing)
        found = search(gallery, embeddings, top_k, threshold)
        return json_response({"results": found.to_dicts(), "threshold": threshold,
                             "gallery_version": gallery.version, "gallery_identities": len(gallery),
                             **self._response_fields()}, headers=timing.fields())

    def _plan_identify(self, payload: Any):
        own, rest = split_identify_payload(payload)
        return (identify_params(own, self.identity.top_k, self.identity.threshold),
                plan_embed_json(rest, self.limits))

    @api.get("/v1/info")
    async def http_info(self, request: Request) -> Response:
        """Diagnostics: the engine (backend, model, precision, contract, fallback report),
        the batching settings in force and live batch statistics of this replica."""
        self._check_auth(request.headers.get("authorization"))
        return json_response(self.describe())

    @api.get("/healthz")
    async def http_health(self, request: Request) -> dict[str, Any]:
        """Liveness, no auth needed: ``{"status": "ok"}``; what is serving (model, backend,
        contract) only to an authorized caller, or to anyone when auth is off."""
        if self.auth.enabled and not self.auth.check(request.headers.get("authorization")):
            return {"status": "ok"}
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
                "max_request_pixels": self.limits.max_request_pixels,
                "max_pending_faces": self.settings.max_pending_faces,
                "pending_faces": self.admission.pending_faces,
                "admission": self.admission.summary(),
                "decode_queue": {"threads": self.settings.decode_threads, "running": self._decoder.running,
                                 "waiting_requests": self._decoder.waiting_jobs},
                "auth": self.auth.enabled,
            },
            "batch_stats": self.stats.summary(),
        }

    # -- gRPC (method names are the RPC names; requests arrive as raw bytes) -----------------
    def _grpc_auth(self, grpc_context) -> None:
        metadata = dict(grpc_context.invocation_metadata()) if grpc_context is not None else {}
        self._check_auth(metadata.get("authorization"))

    async def _grpc_embed(self, faces: list, crops: bytes, encoding: int, grpc_context) -> pb.EmbedResponse:
        """The embeddings in the answer ``encoding`` asked for (``codec.grpc_embed_response``), with
        the timing fields in the trailing metadata (as HTTP's headers)."""
        timing = RequestTiming()
        check_grpc_encoding(encoding)  # before any work: a caller that cannot read the answer
        self.admission.check_open()
        plan = plan_grpc_faces(faces, crops, self.limits)
        crops_array = plan if isinstance(plan, np.ndarray) else await self._crops(plan, timing)
        embeddings, norms = await self.embed(crops_array, timing)
        reply = grpc_embed_response(embeddings, norms, self._response_fields(), encoding)
        if grpc_context is not None:
            grpc_context.set_trailing_metadata(timing.grpc_metadata())
        return reply

    @grpc_method(pb.EmbedRequest, pb.EmbedResponse)
    async def Embed(self, request: pb.EmbedRequest, grpc_context=None) -> pb.EmbedResponse:
        self._grpc_auth(grpc_context)
        return await self._grpc_embed([request.face], b"", request.encoding, grpc_context)

    @grpc_method(pb.EmbedBatchRequest, pb.EmbedResponse)
    async def EmbedBatch(self, request: pb.EmbedBatchRequest, grpc_context=None) -> pb.EmbedResponse:
        self._grpc_auth(grpc_context)
        return await self._grpc_embed(list(request.faces), request.crops, request.encoding, grpc_context)

    @grpc_method(pb.IdentifyRequest, pb.IdentifyResponse)
    async def Identify(self, request: pb.IdentifyRequest, grpc_context=None) -> pb.IdentifyResponse:
        self._grpc_auth(grpc_context)
        self.admission.check_open()
        gallery = self.gallery.current()
        own = {"top_k": request.top_k or self.identity.top_k}
        if request.HasField("threshold"):
            own["threshold"] = request.threshold
        top_k, threshold = identify_params(own, self.identity.top_k, self.identity.threshold)
        timing = RequestTiming()
        plan = plan_grpc_faces(list(request.faces), request.crops, self.limits)
        crops = plan if isinstance(plan, np.ndarray) else await self._crops(plan, timing)
        found = search(gallery, (await self.embed(crops, timing))[0], top_k, threshold)
        if grpc_context is not None:
            grpc_context.set_trailing_metadata(timing.grpc_metadata())
        return pb.IdentifyResponse(
            results=[pb.Identification(identity=r["identity"], match=r["match"], score=r["score"],
                                       candidates=[pb.Candidate(**c) for c in r["candidates"]])
                     for r in found.to_dicts()],
            threshold=threshold, contract=self.engine_info.contract, model=self.engine_info.model_id,
            gallery_version=gallery.version, gallery_identities=len(gallery),
        )

    @grpc_method(pb.HealthRequest, pb.HealthResponse)
    async def Health(self, request: pb.HealthRequest, grpc_context=None) -> pb.HealthResponse:
        """Liveness; what is serving only to an authorized caller (as ``/healthz``)."""
        metadata = dict(grpc_context.invocation_metadata()) if grpc_context is not None else {}
        if self.auth.enabled and not self.auth.check(metadata.get("authorization")):
            return pb.HealthResponse(status="ok")
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
