"""The service's error shape and its catch-alls: one place per protocol.

Every refusal a client sees is ``{"error": {"status", "reason", "message"}}`` (HTTP, JSON) or a
gRPC status whose details read ``"<reason>: <message>"``. ``reason`` is a short tag from
``REASONS`` (also the ``reason`` label of ``arcface_rejected_requests``); messages are built
from the request but never carry a traceback, a file path, a pid or an address, and are
always encodable (a lone UTF-16 surrogate sent in a JSON string is escaped, not a 500).

- **HTTP, in the replica**: routes raise ``RequestError``; ``install_http_handlers`` makes the
  FastAPI app render it (and Starlette's own 404/405) in the shape above, and wraps the app in
  ``CatchAllMiddleware``: anything else becomes a 500 ``internal`` naming an error id that the
  replica log carries with the traceback.
- **gRPC, in the replica**: ``grpc_method`` wraps each RPC: the raw request bytes are parsed
  there (malformed protobuf is ``INVALID_ARGUMENT``), ``RequestError`` becomes its status code,
  anything else ``INTERNAL`` with an error id.
- **In Serve's proxy**, where a request may never reach a replica (backpressure, a replica
  killed mid-request, no route): ``proxy_hooks`` rewrites Serve's own answers into the same
  shape (HTTP) and the same details format (gRPC).
"""

from __future__ import annotations

import functools
import json
import logging
import uuid
from typing import Any

logger = logging.getLogger(__name__)

# Reason tags, by HTTP status (the README's error table lists them).
REASONS: dict[str, int] = {
    "bad_json": 400, "bad_base64": 400, "bad_npy": 400, "bad_protobuf": 400, "bad_multipart": 400,
    "bad_request": 400,
    "unauthorized": 401,
    "cross_origin": 403,
    "not_found": 404, "method_not_allowed": 405, "timeout": 408,
    "contract_mismatch": 409, "no_gallery": 409,
    "body_too_large": 413, "too_many_faces": 413, "image_too_large": 413, "request_too_large": 413,
    "unsupported_media_type": 415, "unsupported_format": 415,
    "not_an_image": 422, "bad_shape": 422, "bad_dtype": 422, "empty": 422, "not_aligned": 422,
    "bad_landmarks": 422, "bad_embedding": 422, "bad_crop": 422,
    "internal": 500,
    "overloaded": 503, "queue_timeout": 503, "replica_unavailable": 503, "unavailable": 503,
}
RETRYABLE_STATUSES = (503,)
DEFAULT_RETRY_AFTER_S = 1


def safe_text(text: Any, limit: int = 1000) -> str:
    """``text`` as a string any JSON encoder and any gRPC status can carry: lone surrogates and
    other unencodable code points backslash-escaped, at most ``limit`` characters."""
    out = str(text).encode("utf-8", "backslashreplace").decode("utf-8")
    return out if len(out) <= limit else out[: limit - 15] + "... [truncated]"


class RequestError(Exception):
    """A refused request: ``status`` (HTTP), ``reason`` (a ``REASONS`` tag), human message."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        message = safe_text(message)
        super().__init__(message)
        self.status = status
        self.reason = reason
        self.message = message

    def to_dict(self) -> dict[str, Any]:
        return error_payload(self.status, self.reason, self.message)


def error_payload(status: int, reason: str, message: str) -> dict[str, Any]:
    return {"error": {"status": status, "reason": reason, "message": safe_text(message)}}


def error_body(status: int, reason: str, message: str) -> bytes:
    return json.dumps(error_payload(status, reason, message), separators=(",", ":")).encode()


def error_headers(status: int, retry_after_s: float = DEFAULT_RETRY_AFTER_S) -> dict[str, str]:
    """Headers every error of ``status`` carries: 401 the auth scheme, 503 when to retry."""
    if status == 401:
        return {"WWW-Authenticate": "Bearer"}
    if status in RETRYABLE_STATUSES:
        return {"Retry-After": str(max(1, int(-(-retry_after_s // 1))))}
    return {}


def new_error_id() -> str:
    return uuid.uuid4().hex[:12]


# -- HTTP (the replica's FastAPI app) ------------------------------------------------------
class ErrorReporter:
    """What the replica does with each refusal: count it (``reason``, ``protocol``) and say
    when to retry. The deployment binds its own (``bind_reporter``); a no-op until then."""

    def __init__(self, metrics=None, retry_after_s: float = DEFAULT_RETRY_AFTER_S) -> None:
        self.metrics = metrics
        self.retry_after_s = retry_after_s

    def count(self, reason: str, protocol: str) -> None:
        if self.metrics is not None:
            self.metrics.reject(reason, protocol)

    def http_response(self, err: RequestError):
        from fastapi.responses import Response

        self.count(err.reason, "http")
        return Response(error_body(err.status, err.reason, err.message), status_code=err.status,
                        media_type="application/json", headers=error_headers(err.status, self.retry_after_s))


_REPORTER = ErrorReporter()


def bind_reporter(reporter: ErrorReporter) -> None:
    """The reporter of this process's replica. Module state, not ``app.state``: ``serve.ingress``
    serves a pickled copy of the FastAPI app, made at import time, so state set on the
    module's app later never reaches the app that answers (one replica per actor process); and
    the handlers, pickled by value with that copy, read it through ``current_reporter``, a
    module-level function (pickled by reference), never through a global of their own."""
    global _REPORTER
    _REPORTER = reporter


def current_reporter() -> ErrorReporter:
    return _REPORTER


def install_http_handlers(app) -> None:
    """Render ``RequestError`` and Starlette's HTTP errors in our shape; wrap ``app`` in the
    catch-all. Idempotent per app (the module that owns the app calls it once)."""
    from starlette.exceptions import HTTPException

    def reporter(request) -> ErrorReporter:
        return current_reporter()

    async def on_request_error(request, exc: RequestError):
        return reporter(request).http_response(exc)

    async def on_http_exception(request, exc: HTTPException):
        reason = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "bad_request")
        detail = exc.detail if isinstance(exc.detail, str) else "request refused"
        if exc.status_code == 404:
            detail = f"no endpoint {request.url.path!r}; see /docs"
        elif exc.status_code == 405:
            detail = f"{request.method} is not allowed on {request.url.path!r}"
        err = RequestError(exc.status_code, reason, detail)
        response = reporter(request).http_response(err)
        for key, value in (exc.headers or {}).items():  # e.g. Allow on 405
            response.headers[key] = value
        return response

    app.add_exception_handler(RequestError, on_request_error)
    app.add_exception_handler(HTTPException, on_http_exception)
    app.add_middleware(CatchAllMiddleware)


class HttpMiddleware:
    """A pure ASGI middleware that acts on HTTP requests only (websocket and lifespan scopes
    pass straight through): subclasses implement ``handle``."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        await self.handle(scope, receive, send)

    async def handle(self, scope, receive, send) -> None:
        raise NotImplementedError


class CatchAllMiddleware(HttpMiddleware):
    """An exception that escapes the app becomes a 500 ``internal`` in our shape (the
    traceback goes to the replica log under an error id, never to the client)."""

    async def handle(self, scope, receive, send) -> None:
        started = False

        async def tracking_send(message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception:
            error_id = new_error_id()
            logger.exception("unhandled error %s in %s %s", error_id, scope.get("method"), scope.get("path"))
            if started:  # too late for a status; the client sees a cut response
                return
            await send_error(send, 500, "internal", f"internal error (id {error_id}); the request was "
                                                    "not processed, see the replica log for this id")


async def send_error(send, status: int, reason: str, message: str,
                     retry_after_s: float = DEFAULT_RETRY_AFTER_S,
                     extra: dict[str, str] | None = None) -> None:
    """Send a complete error response through a raw ASGI ``send`` (``extra``: more headers)."""
    body = error_body(status, reason, message)
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    more = {**error_headers(status, retry_after_s), **(extra or {})}
    headers += [(k.lower().encode(), v.encode()) for k, v in more.items()]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


# -- gRPC ------------------------------------------------------------------------------------
def grpc_code(status: int):
    import grpc

    return {
        400: grpc.StatusCode.INVALID_ARGUMENT, 401: grpc.StatusCode.UNAUTHENTICATED,
        403: grpc.StatusCode.PERMISSION_DENIED, 404: grpc.StatusCode.NOT_FOUND,
        408: grpc.StatusCode.DEADLINE_EXCEEDED,
        409: grpc.StatusCode.FAILED_PRECONDITION, 413: grpc.StatusCode.RESOURCE_EXHAUSTED,
        500: grpc.StatusCode.INTERNAL, 503: grpc.StatusCode.UNAVAILABLE,
    }.get(status, grpc.StatusCode.INVALID_ARGUMENT)


def grpc_details(reason: str, message: str) -> str:
    return safe_text(f"{reason}: {message}", limit=2000)


def is_our_grpc_details(details: str | None) -> bool:
    """Details written by ``grpc_method`` (``"<known reason>: ..."``), as opposed to Serve's."""
    return bool(details) and details.split(":", 1)[0] in REASONS


def grpc_method(request_type, response_type):
    """Decorator of one RPC of the deployment: parse the raw request bytes the proxy passes
    (see ``proxy_hooks.add_embedding_service``) into ``request_type``, refuse messages over the
    body limit before parsing, and turn every failure into a status (``RequestError``: its
    code; anything else: ``INTERNAL`` with an error id). Returns an empty ``response_type``
    on failure, as the generated stubs expect."""

    def wrap(method):
        @functools.wraps(method)
        async def rpc(self, request, grpc_context=None):
            try:
                return await method(self, _parse_request(request, request_type, self.limits.max_body_bytes),
                                    grpc_context)
            except RequestError as err:
                self.errors.count(err.reason, "grpc")
                _set_status(grpc_context, err.status, err.reason, err.message)
            except Exception:
                error_id = new_error_id()
                logger.exception("unhandled error %s in gRPC %s", error_id, method.__name__)
                self.errors.count("internal", "grpc")
                _set_status(grpc_context, 500, "internal",
                            f"internal error (id {error_id}); see the replica log for this id")
            return response_type()

        return rpc

    return wrap


def _parse_request(request, request_type, max_bytes: int):
    if not isinstance(request, (bytes, bytearray, memoryview)):
        return request  # already a message (a DeploymentHandle caller)
    if len(request) > max_bytes:
        raise RequestError(413, "body_too_large", f"message of {len(request)} bytes exceeds the "
                                                  f"{max_bytes}-byte limit (max_body_mb)")
    from google.protobuf.message import DecodeError

    try:
        return request_type.FromString(bytes(request))
    except (DecodeError, ValueError) as exc:  # ValueError: e.g. invalid UTF-8 in a string field
        raise RequestError(400, "bad_protobuf",
                           f"request is not a valid {request_type.DESCRIPTOR.full_name} message: {exc}") \
            from None


def _set_status(grpc_context, status: int, reason: str, message: str) -> None:
    if grpc_context is None:
        raise RequestError(status, reason, message)
    grpc_context.set_code(grpc_code(status))
    grpc_context.set_details(grpc_details(reason, message))
