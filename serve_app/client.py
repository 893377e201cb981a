"""Python clients of the embedding service: ``EmbeddingClient`` (sync), ``AsyncEmbeddingClient``
(asyncio) and ``GrpcEmbeddingClient``.

What every integrator would otherwise re-implement: ``.npy`` framing (the default transport of
crops; JSON with ``transport="json"``), the bearer token, retries with exponential backoff on
503 / ``UNAVAILABLE`` that wait at least the service's ``Retry-After``, splitting an array
larger than the service's ``max_faces_per_request`` (read once from ``/v1/info``) into several
requests, and the embedding contract: a client expects one (``expected_contract``, or the
first one the service reports) and raises ``ContractMismatch`` on any answer in another space,
so embeddings of two models are never mixed. Every embed returns ``EmbedResult(embeddings,
norms, contract)``; ``last_timing`` holds the timing headers of the last answer.

    from serve_app.client import EmbeddingClient
    with EmbeddingClient("http://127.0.0.1:8000", token="...") as client:
        embeddings, norms, contract = client.embed(crops)  # (N, 112, 112, 3) uint8 BGR

Answers (``accept``): ``"base64"`` by default, JSON whose embeddings are their float32 bytes
(exact, 0.43x the bytes of numbers, and next to nothing to write or read); ``"json"``, lists of
numbers; ``"npy"``, a ``.npy`` float32 body with the norms in a header. All three give the
same float32 values and the norms (``serve_app.answers``); an older service that knows no
``encoding`` answers lists of numbers, which the client reads as well.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import logging
import time
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

import numpy as np

logger = logging.getLogger(__name__)

NPY = "application/x-npy"
Transport = Literal["npy", "json"]
Accept = Literal["base64", "json", "npy"]
__all__ = ["AsyncEmbeddingClient", "BadAnswer", "ContractMismatch", "EmbedResult", "EmbeddingClient",
           "GrpcEmbeddingClient", "RetryPolicy", "ServiceError", "decode_embed_response"]


class EmbedResult(NamedTuple):
    embeddings: np.ndarray  # (N, dim) float32, unit norm, in input order
    norms: np.ndarray | None  # (N,) norms before L2 normalisation (None: an older service's .npy answer)
    contract: str


class ServiceError(Exception):
    """An answer in the service's error shape (or a transport failure: ``status`` 0)."""

    def __init__(self, status: int, reason: str, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(f"{status} {reason}: {message}")
        self.status, self.reason, self.message, self.retry_after_s = status, reason, message, retry_after_s


class BadAnswer(ServiceError):
    """An answer that does not add up to what was sent (face count, dimension, dtype, finite unit
    vectors, norms), or cannot be read at all: the client never hands such an answer on."""

    def __init__(self, message: str) -> None:
        super().__init__(0, "bad_answer", message)


UNIT_NORM_TOLERANCE = 1e-3  # float32 L2-normalised vectors are within 1e-6 of unit length
MIN_EMBEDDING_DIM = 64  # face-embedding models give 128 to 1024 dimensions; fewer is not an answer


def checked_answer(embeddings: Any, norms: Any, faces: int) -> tuple[np.ndarray, np.ndarray | None]:
    """``(embeddings, norms)`` if they are what ``faces`` sent faces must get back: ``(faces,
    dim)`` float32 with dim >= ``MIN_EMBEDDING_DIM``, finite, unit length within
    ``UNIT_NORM_TOLERANCE``, and (when present) ``faces`` finite positive norms; else
    ``BadAnswer`` saying what is wrong."""
    if not isinstance(embeddings, np.ndarray) or embeddings.ndim != 2 or embeddings.dtype != np.float32:
        shape = getattr(embeddings, "shape", "?")
        dtype = getattr(embeddings, "dtype", type(embeddings).__name__)
        raise BadAnswer(f"embeddings of shape {shape} and dtype {dtype}; expected ({faces}, dim) float32")
    n, dim = embeddings.shape
    if n != faces:
        raise BadAnswer(f"{n} embeddings for {faces} faces sent")
    if dim < MIN_EMBEDDING_DIM:
        raise BadAnswer(f"embeddings of dimension {dim}; no face-embedding model has fewer than "
                        f"{MIN_EMBEDDING_DIM}")
    if not np.isfinite(embeddings).all():
        raise BadAnswer("embeddings hold NaN or infinite values")
    if n and (off := float(np.abs(np.linalg.norm(embeddings, axis=1) - 1.0).max())) > UNIT_NORM_TOLERANCE:
        raise BadAnswer(f"embeddings are not unit vectors (a length is {off:.3g} off 1)")
    if norms is None:
        return embeddings, None
    norms = np.asarray(norms)
    if norms.shape != (faces,) or not np.isfinite(norms).all() or (norms <= 0).any():
        raise BadAnswer(f"norms {norms.shape} do not give one finite positive norm for each of {faces} faces")
    return embeddings, norms.astype(np.float32, copy=False)


class ContractMismatch(Exception):
    """The service answered in another embedding space than the one this client expects."""


@dataclass(frozen=True)
class RetryPolicy:
    """Retries of retryable refusals (503, ``UNAVAILABLE``, connection errors): at most
    ``retries`` more tries, waiting ``backoff_s * 2**attempt`` (capped at ``max_backoff_s``)
    and never less than the service's ``Retry-After``."""

    retries: int = 5
    backoff_s: float = 0.1
    max_backoff_s: float = 10.0
    max_retry_after_s: float = 60.0  # a server's Retry-After beyond this is not obeyed past it

    def delay(self, attempt: int, retry_after_s: float | None) -> float:
        asked = min(retry_after_s or 0.0, self.max_retry_after_s)
        return max(asked, min(self.max_backoff_s, self.backoff_s * 2 ** attempt))


def _retry_after(value: str | None) -> float | None:
    try:
        seconds = float(value) if value else None
    except ValueError:
        return None
    return seconds if seconds is not None and 0 <= seconds < float("inf") else None


def _error(status: int, body: bytes, retry_after: str | None) -> ServiceError:
    try:
        err = json.loads(body)["error"]
        return ServiceError(status, err["reason"], err["message"], _retry_after(retry_after))
    except (ValueError, KeyError, TypeError):
        return ServiceError(status, "unknown", body[:200].decode(errors="replace"), _retry_after(retry_after))


def _npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def _float32s(text: str, count: int, where: str) -> np.ndarray:
    """``count`` little-endian float32 from base64 ``text``; a short or long payload is an error
    (a truncated answer must not be read as fewer faces)."""
    raw = base64.b64decode(text)
    if len(raw) != count * 4:
        raise ServiceError(0, "bad_answer",
                           f"{where}: {len(raw)} bytes, expected {count} float32 ({count * 4} bytes)")
    return np.frombuffer(raw, "<f4").astype(np.float32, copy=False)


def _chunks(n: int, size: int) -> list[slice]:
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


class _Protocol:
    """What the sync and asyncio clients share: bodies, answers, contract, splitting."""

    def __init__(self, url: str, token: str | None = None, expected_contract: str | None = None,
                 transport: Transport = "npy", accept: Accept = "base64", timeout_s: float = 120.0,
                 retry: RetryPolicy | None = None, max_faces_per_request: int | None = None,
                 max_answer_mb: float = 64.0) -> None:
        if transport not in ("npy", "json") or accept not in ("base64", "json", "npy"):
            raise ValueError(f"transport must be npy or json, accept base64, json or npy; got {transport}, "
                             f"{accept}")
        self.url = url.rstrip("/")
        self.headers = {"authorization": f"Bearer {token}"} if token else {}
        self.expected_contract = expected_contract
        self.transport, self.accept, self.timeout_s = transport, accept, timeout_s
        self.retry = retry or RetryPolicy()
        self.max_faces = max_faces_per_request  # None: read from /v1/info on first use
        # an answer (or error body) larger is refused unread: 256 faces as JSON lists are ~2 MB
        self.max_answer_bytes = int(max_answer_mb * (1 << 20))
        self.last_timing: dict[str, float] = {}

    @property
    def embed_path(self) -> str:
        """``/v1/embed``, asking for base64 embeddings where ``accept`` says so."""
        return "/v1/embed?encoding=base64" if self.accept == "base64" else "/v1/embed"

    def _answer_headers(self) -> dict[str, str]:
        return {**self.headers, "accept": NPY if self.accept == "npy" else "application/json"}

    def _crops_request(self, crops: np.ndarray) -> tuple[dict[str, str], dict[str, Any]]:
        headers = self._answer_headers()
        if self.transport == "npy":
            return {**headers, "content-type": NPY}, {"data": _npy(crops)}
        b64 = [base64.b64encode(np.ascontiguousarray(c).tobytes()).decode() for c in crops]
        return headers, {"json": {"crops": b64}}

    def _result(self, headers, body: bytes, faces: int) -> EmbedResult:
        """The answer to ``faces`` faces, checked (``checked_answer``); one that cannot be read
        is a ``BadAnswer`` too, never a raw parsing error."""
        try:
            result = self._parse(headers, body)
        except (ValueError, TypeError, KeyError, IndexError, OverflowError, AttributeError) as exc:
            raise BadAnswer(f"unreadable answer ({type(exc).__name__}: {str(exc)[:200]})") from None
        embeddings, norms = checked_answer(result.embeddings, result.norms, faces)
        return EmbedResult(embeddings, norms, result.contract)

    def _parse(self, headers, body: bytes) -> EmbedResult:
        self.last_timing = {k: float(v) for k, v in headers.items() if k.lower().startswith("x-") and
                            k.lower().endswith(("-time", "-faces"))}
        if (headers.get("content-type") or "").startswith(NPY):
            embeddings = np.load(io.BytesIO(body), allow_pickle=False)
            packed = headers.get("x-arcface-norms")
            norms = None if packed is None else _float32s(packed, len(embeddings), "x-arcface-norms")
            return EmbedResult(embeddings, norms, self._check(headers.get("x-arcface-contract", "")))
        payload = json.loads(body)
        dim = int(payload["dim"])
        values = payload["embeddings"]
        if payload.get("encoding", "json") == "base64":
            n = len(payload["norms"])
            embeddings = _float32s(values, n * dim, "embeddings").reshape(n, dim)
        else:
            embeddings = np.asarray(values, np.float32).reshape(-1, dim)
        norms = np.asarray(payload["norms"], np.float32)
        return EmbedResult(embeddings, norms, self._check(payload["contract"]))

    def _check(self, contract: str) -> str:
        if self.expected_contract is None:
            self.expected_contract = contract
        elif contract != self.expected_contract:
            raise ContractMismatch(f"the service answers in contract {contract!r}, this client expects "
                                   f"{self.expected_contract!r}: embeddings of different models are not "
                                   "comparable")
        return contract

    def _info_limits(self, info: dict[str, Any]) -> None:
        self.max_faces = int(info["service"]["max_faces_per_request"])
        self._check(info["contract"])

    @staticmethod
    def _images_request(images: list[bytes], landmarks, transport: str) -> dict[str, Any]:
        lms = None if landmarks is None else [np.asarray(k, float).tolist() for k in landmarks]
        if transport == "multipart":
            files = [("images", (f"image{i}", data, "application/octet-stream"))
                     for i, data in enumerate(images)]
            return {"files": files, "data": {} if lms is None else {"landmarks": json.dumps(lms)}}
        body: dict[str, Any] = {"images": [base64.b64encode(d).decode() for d in images]}
        if lms is not None:
            body["landmarks"] = lms
        return {"json": body}

    @staticmethod
    def _join(parts: list[EmbedResult]) -> EmbedResult:
        if len(parts) == 1:
            return parts[0]
        dims = sorted({p.embeddings.shape[1] for p in parts})
        if len(dims) > 1:
            raise BadAnswer(f"answers of dimensions {dims} to one call")
        norms = None if parts[0].norms is None else np.concatenate([p.norms for p in parts])
        return EmbedResult(np.concatenate([p.embeddings for p in parts]), norms, parts[0].contract)


@dataclass(frozen=True)
class _Answer:
    """An HTTP answer read whole, within the client's deadline and size bound."""

    status_code: int
    headers: Any
    content: bytes

    def json(self) -> Any:
        try:
            return json.loads(self.content)
        except ValueError as exc:
            raise BadAnswer(f"an answer that is not JSON ({exc})") from None


def _too_large(size: int, limit: int) -> BadAnswer:
    return BadAnswer(f"an answer of {size:,} bytes; at most {limit:,} are read (max_answer_mb)")


class _Closing:
    """``with client:`` closes it (its session or channel)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        raise NotImplementedError


class EmbeddingClient(_Closing, _Protocol):
    """Blocking client (``requests``); see the module docstring. Thread-safe for ``embed``."""

    def __init__(self, url: str, **options: Any) -> None:
        import requests

        super().__init__(url, **options)
        self._session = requests.Session()

    def close(self) -> None:
        self._session.close()

    def _send(self, method: str, path: str, headers: dict[str, str] | None = None, **kwargs: Any):
        import requests

        for attempt in range(self.retry.retries + 1):
            try:
                resp = self._exchange(method, path, headers or self.headers, kwargs)
                err = None if resp.status_code == 200 else _error(resp.status_code, resp.content,
                                                                  resp.headers.get("retry-after"))
            except requests.ConnectionError as exc:
                resp, err = None, ServiceError(0, "connection", str(exc))
            except requests.Timeout as exc:
                resp, err = None, ServiceError(0, "timeout", str(exc))
            if err is None:
                return resp
            if err.reason == "timeout" or err.status not in (0, 503) or attempt == self.retry.retries:
                raise err
            delay = self.retry.delay(attempt, err.retry_after_s)
            logger.info("%s %s: %s; retry %d in %.2f s", method, path, err.reason, attempt + 1, delay)
            time.sleep(delay)
        raise AssertionError("unreachable")

    def _exchange(self, method: str, path: str, headers: dict[str, str], kwargs: dict[str, Any]) -> _Answer:
        """One request and its whole answer within ``timeout_s`` in total (``requests``' own
        timeout bounds each read only, so a body trickled a byte at a time never ends) and at
        most ``max_answer_bytes`` (refused before reading when the declared length is larger)."""
        import requests
        from urllib3.exceptions import HTTPError as Urllib3Error

        deadline = time.monotonic() + self.timeout_s
        resp = self._session.request(method, self.url + path, headers=headers, timeout=self.timeout_s,
                                     stream=True, **kwargs)
        with resp:
            declared = resp.headers.get("content-length", "")
            if declared.isdigit() and int(declared) > self.max_answer_bytes:
                raise _too_large(int(declared), self.max_answer_bytes)
            chunks, total, late = [], 0, False
            try:
                while not late and (chunk := resp.raw.read1(1 << 16, decode_content=True)):
                    total += len(chunk)
                    if total > self.max_answer_bytes:
                        raise _too_large(total, self.max_answer_bytes)
                    chunks.append(chunk)
                    late = time.monotonic() > deadline
            except (Urllib3Error, OSError) as exc:
                raise requests.ConnectionError(f"the answer was cut: {exc}") from None
        if late:
            raise requests.Timeout(f"no whole answer within timeout_s={self.timeout_s:g} s")
        return _Answer(resp.status_code, resp.headers, b"".join(chunks))

    def info(self) -> dict[str, Any]:
        return self._send("GET", "/v1/info").json()

    def health(self) -> dict[str, Any]:
        return self._send("GET", "/healthz").json()

    def _limit(self) -> int:
        if self.max_faces is None:
            self._info_limits(self.info())
        return self.max_faces

    def embed(self, crops: np.ndarray) -> EmbedResult:
        """Embeddings of aligned ``(N, 112, 112, 3)`` uint8 BGR crops, in requests of at most
        ``max_faces_per_request`` faces."""
        crops = np.asarray(crops)
        parts = []
        for part in _chunks(len(crops), self._limit()):
            headers, body = self._crops_request(crops[part])
            resp = self._send("POST", self.embed_path, headers, **body)
            parts.append(self._result(resp.headers, resp.content, len(crops[part])))
        return self._join(parts)

    def embed_images(self, images: list[bytes], landmarks: list | None = None,
                     transport: Literal["json", "multipart"] = "json") -> EmbedResult:
        """Embeddings of encoded images (aligned crops, or any image with its 5 landmarks each),
        sent as JSON base64 or as ``multipart/form-data`` files."""
        parts = []
        for part in _chunks(len(images), self._limit()):
            marks = None if landmarks is None else landmarks[part]
            body = self._images_request(images[part], marks, transport)
            resp = self._send("POST", self.embed_path, self._answer_headers(), **body)
            parts.append(self._result(resp.headers, resp.content, len(images[part])))
        return self._join(parts)

    def compare(self, a: dict[str, Any], b: dict[str, Any], threshold: float | None = None) -> dict[str, Any]:
        """``/v1/compare`` of two face specs (``{"image"|"crop"|"embedding": ...}``); the
        client's contract goes along, so embeddings of another space are refused (409)."""
        body: dict[str, Any] = {"a": a, "b": b}
        if threshold is not None:
            body["threshold"] = threshold
        if self.expected_contract:
            body["contract"] = self.expected_contract
        resp = self._send("POST", "/v1/compare", json=body)
        self._check(resp.json()["contract"])
        return resp.json()


class AsyncEmbeddingClient(_Protocol):
    """asyncio client (``aiohttp``), the same calls as ``EmbeddingClient`` awaited. Create and
    use it inside one event loop; ``async with`` closes its session."""

    def __init__(self, url: str, connections: int = 100, **options: Any) -> None:
        super().__init__(url, **options)
        self._connections = connections
        self._session = None

    async def __aenter__(self) -> AsyncEmbeddingClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _http(self):
        import aiohttp

        if self._session is None:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self.timeout_s),
                connector=aiohttp.TCPConnector(limit=self._connections))
        return self._session

    async def _send(self, method: str, path: str, headers: dict[str, str] | None = None,
                    **kwargs: Any) -> tuple[Any, bytes]:
        import aiohttp

        for attempt in range(self.retry.retries + 1):
            try:
                async with self._http().request(method, self.url + path, headers=headers or self.headers,
                                                **kwargs) as resp:
                    if (resp.content_length or 0) > self.max_answer_bytes:
                        raise _too_large(resp.content_length, self.max_answer_bytes)
                    chunks, total = [], 0
                    async for chunk in resp.content.iter_chunked(1 << 16):
                        total += len(chunk)
                        if total > self.max_answer_bytes:
                            raise _too_large(total, self.max_answer_bytes)
                        chunks.append(chunk)
                    body = b"".join(chunks)
                    err = None if resp.status == 200 else _error(resp.status, body,
                                                                 resp.headers.get("retry-after"))
                    resp_headers = resp.headers
            except aiohttp.ClientConnectionError as exc:
                err = ServiceError(0, "connection", str(exc))
            except TimeoutError:  # the session's total timeout: the whole exchange, not one read
                err = ServiceError(0, "timeout", f"no whole answer within timeout_s={self.timeout_s:g} s")
            if err is None:
                return resp_headers, body
            if err.reason == "timeout" or err.status not in (0, 503) or attempt == self.retry.retries:
                raise err
            await asyncio.sleep(self.retry.delay(attempt, err.retry_after_s))
        raise AssertionError("unreachable")

    async def info(self) -> dict[str, Any]:
        return _Answer(200, {}, (await self._send("GET", "/v1/info"))[1]).json()

    async def health(self) -> dict[str, Any]:
        return _Answer(200, {}, (await self._send("GET", "/healthz"))[1]).json()

    async def _limit(self) -> int:
        if self.max_faces is None:
            self._info_limits(await self.info())
        return self.max_faces

    async def embed(self, crops: np.ndarray) -> EmbedResult:
        crops = np.asarray(crops)
        parts = []
        for part in _chunks(len(crops), await self._limit()):
            headers, body = self._crops_request(crops[part])
            parts.append(self._result(*(await self._send("POST", self.embed_path, headers, **body)),
                                      len(crops[part])))
        return self._join(parts)

    async def embed_images(self, images: list[bytes], landmarks: list | None = None,
                           transport: Literal["json", "multipart"] = "json") -> EmbedResult:
        import aiohttp

        parts = []
        for part in _chunks(len(images), await self._limit()):
            marks = None if landmarks is None else landmarks[part]
            body = self._images_request(images[part], marks, transport)
            if transport == "multipart":
                form = aiohttp.FormData()
                for name, (filename, data, ctype) in body["files"]:
                    form.add_field(name, data, filename=filename, content_type=ctype)
                for name, value in body["data"].items():
                    form.add_field(name, value)
                body = {"data": form}
            answer = await self._send("POST", self.embed_path, self._answer_headers(), **body)
            parts.append(self._result(*answer, len(images[part])))
        return self._join(parts)


def decode_embed_response(reply, expected_faces: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(embeddings (N, dim) float32, norms (N,))`` of an ``EmbedResponse`` in either encoding:
    ``PACKED`` (one ``frombuffer``, no per-face loop) or ``REPEATED`` (what a server older than
    the packed fields answers, whatever was asked). Raises ``ValueError`` on an answer that does
    not add up (bytes not N * dim * 4, or not ``expected_faces`` faces)."""
    from .protos import embedding_pb2 as pb

    if reply.encoding == pb.PACKED:
        n, dim, size = len(reply.norms), reply.dim, len(reply.embeddings_f32)
        if dim <= 0 or size != n * dim * 4:
            raise ValueError(f"malformed PACKED answer: {size} bytes of embeddings_f32 for {n} norms of "
                             f"dim {dim} (expected {max(n * dim * 4, 0)})")
        embeddings = np.frombuffer(reply.embeddings_f32, "<f4").reshape(n, dim)
        norms = np.asarray(reply.norms, np.float32)
    elif reply.encoding == pb.REPEATED:
        dim = reply.dim
        embeddings = np.asarray([e.values for e in reply.embeddings], np.float32).reshape(-1, dim)
        norms = np.asarray([e.norm for e in reply.embeddings], np.float32)
    else:
        raise ValueError(f"answer in encoding {reply.encoding}, which this client does not know")
    if expected_faces is not None and len(embeddings) != expected_faces:
        raise ValueError(f"the service answered {len(embeddings)} embeddings for {expected_faces} faces")
    return embeddings, norms


class GrpcEmbeddingClient(_Closing):
    """``EmbeddingService`` over gRPC: ``embed(crops)`` as ``EmbedBatch`` of raw crops, split
    at ``max_faces_per_request``, retried on ``UNAVAILABLE``; ``last_timing`` from the trailing
    metadata. ``application``: the Serve application name (the ``application`` metadata).
    ``encoding``: the answer encoding asked for, ``"packed"`` (default: one bytes field) or
    ``"repeated"`` (one message per face); answers of either kind are read (an older server
    answers repeated whatever is asked)."""

    def __init__(self, target: str, application: str | None = None, token: str | None = None,
                 expected_contract: str | None = None, max_faces_per_request: int = 256,
                 timeout_s: float = 120.0, retry: RetryPolicy | None = None,
                 encoding: Literal["packed", "repeated"] = "packed") -> None:
        import grpc

        from .protos import embedding_pb2 as pb
        from .protos import embedding_pb2_grpc as pb_grpc

        if encoding not in ("packed", "repeated"):
            raise ValueError(f"encoding must be packed or repeated, got {encoding!r}")
        self._channel = grpc.insecure_channel(target, options=GRPC_CHANNEL_OPTIONS)
        self.stub = pb_grpc.EmbeddingServiceStub(self._channel)
        self.metadata = grpc_metadata(application, token)
        self.encoding = pb.PACKED if encoding == "packed" else pb.REPEATED
        self._contract = _Protocol("grpc://" + target, expected_contract=expected_contract)
        self.max_faces, self.timeout_s = max_faces_per_request, timeout_s
        self.retry = retry or RetryPolicy()
        self.last_timing: dict[str, float] = {}

    def close(self) -> None:
        self._channel.close()

    @property
    def expected_contract(self) -> str | None:
        return self._contract.expected_contract

    def _call(self, method, request):
        import grpc

        for attempt in range(self.retry.retries + 1):
            try:
                reply, call = method.with_call(request, metadata=self.metadata, timeout=self.timeout_s)
                self.last_timing = {k: float(v) for k, v in call.trailing_metadata() or ()
                                    if k.endswith(("-time", "-faces"))}
                return reply
            except grpc.RpcError as exc:
                if exc.code() != grpc.StatusCode.UNAVAILABLE or attempt == self.retry.retries:
                    raise
                time.sleep(self.retry.delay(attempt, None))
        raise AssertionError("unreachable")

    def _result(self, reply, faces: int) -> EmbedResult:
        try:
            embeddings, norms = decode_embed_response(reply, faces)
        except ValueError as exc:
            raise BadAnswer(str(exc)) from None
        embeddings, norms = checked_answer(embeddings, norms, faces)
        return EmbedResult(embeddings, norms, self._contract._check(reply.contract))

    def embed(self, crops: np.ndarray) -> EmbedResult:
        from .protos import embedding_pb2 as pb

        crops = np.ascontiguousarray(crops, np.uint8)
        parts = []
        for part in _chunks(len(crops), self.max_faces):
            request = pb.EmbedBatchRequest(crops=crops[part].tobytes(), encoding=self.encoding)
            parts.append(self._result(self._call(self.stub.EmbedBatch, request), len(crops[part])))
        return _Protocol._join(parts)

    def embed_image(self, image: bytes, landmarks=None) -> EmbedResult:
        """One encoded image (``Embed``), aligned by ``landmarks`` (5 [x, y]) when given."""
        from .protos import embedding_pb2 as pb

        face = pb.Face(image=image, landmarks=[] if landmarks is None else np.ravel(landmarks).tolist())
        request = pb.EmbedRequest(face=face, encoding=self.encoding)
        return self._result(self._call(self.stub.Embed, request), 1)


# No message size limit on the client side: the service's own limit (max_body_mb) refuses.
GRPC_CHANNEL_OPTIONS = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]


def grpc_metadata(application: str | None, token: str | None) -> list[tuple[str, str]]:
    """The call metadata: Serve's ``application`` routing key and the bearer token, when given."""
    return ([("application", application)] if application else []) + (
        [("authorization", f"Bearer {token}")] if token else [])
