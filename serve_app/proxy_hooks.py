"""Code that runs inside Ray Serve's proxy, where a request may be answered without reaching
a replica: the service's error shape there too (see ``errors``).

Two hooks, both loaded by the proxy process itself (plus ``LoadShedding``, which refuses the
bulk of an overload here before it costs a replica anything: ``shedding``):

- ``http_middlewares``: the callback Serve calls when ``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH``
  names it (set through ``controller_options`` in ``config/serve.yaml``; proxies inherit the
  controller's environment). ``ServeErrorShape`` rewrites Serve's own plain-text errors into
  ``{"error": {...}}``: its backpressure 503 (``max_queued_requests``) as ``overloaded``, an
  unknown route as ``not_found``, its timeout as ``timeout``, and a request whose replica died
  before answering (Serve sends nothing and the HTTP server would answer a bare 500) as a
  retryable 503 ``replica_unavailable``. Every 503 carries ``Retry-After``. Responses from our
  replicas (JSON errors, ``.npy`` or JSON results, ``/docs``) pass through untouched.
- ``add_embedding_service``: the ``grpc_servicer_functions`` entry. It registers the
  ``EmbeddingService`` methods with no request deserializer, so the proxy forwards the raw
  bytes and the replica parses them (malformed protobuf is then ``INVALID_ARGUMENT`` in our
  format, not the ``UNKNOWN`` a failing deserializer gives in the proxy), and rewrites the
  statuses Serve produces on its own (a dead replica's ``INTERNAL`` with a Ray traceback,
  backpressure's ``RESOURCE_EXHAUSTED``) into ``UNAVAILABLE`` with ``"<reason>: <message>"``
  details. It relies on ``gRPCGenericServer.service_handler_factory`` (Ray 2.60, the pinned
  version; the gRPC tests fail if a Ray upgrade moves it).
"""

from __future__ import annotations

import logging

from .errors import (
    DEFAULT_RETRY_AFTER_S,
    REASONS,
    HttpMiddleware,
    is_our_grpc_details,
    safe_text,
    send_error,
)
from .shedding import AdaptiveThrottle

logger = logging.getLogger(__name__)

HTTP_CALLBACK = "serve_app.proxy_hooks:http_middlewares"
GRPC_SERVICER = "serve_app.proxy_hooks.add_embedding_service"
_MAX_ERROR_BODY = 64 << 10


def http_middlewares() -> list:
    """``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH`` callback: the proxy's extra middlewares
    (the last wraps the others: load shedding first, and it sees the rewritten statuses)."""
    from starlette.middleware import Middleware

    return [Middleware(ServeErrorShape), Middleware(LoadShedding)]


def _header(headers, name: bytes) -> bytes:
    for key, value in headers or ():
        if key.lower() == name:
            return value
    return b""


def _classify(status: int, text: str) -> tuple[int, str, str]:
    """(status, reason, message) for one of Serve's own plain-text error answers."""
    text = safe_text(text.strip(), limit=300)
    if status in (429, 503):
        if "backpressure" in text:
            return status, "overloaded", ("the service is at capacity (the proxy's queue for it is full, "
                                          "max_queued_requests); retry later")
        return 503, "unavailable", (f"the service cannot take requests now ({text or 'no replica'}); "
                                    "retry later")
    if status == 404:
        return 404, "not_found", text or "no such route; GET /-/routes lists the applications"
    if status == 408:
        return 408, "timeout", text or "the request took longer than the proxy's request_timeout_s"
    if status >= 500:
        return 503, "replica_unavailable", ("the replica handling this request failed before answering; "
                                            "retry")
    reason = next((r for r, s in REASONS.items() if s == status), "bad_request")
    return status, reason, text or "request refused"


class ServeErrorShape(HttpMiddleware):
    """Around Serve's proxy app: Serve's own error answers in our shape (see the module doc)."""

    async def handle(self, scope, receive, send) -> None:
        started = False
        held: dict | None = None  # a plain-text error being collected for rewriting

        async def shaping_send(message) -> None:
            nonlocal started, held
            kind = message["type"]
            if kind == "http.response.start":
                status = int(message["status"])
                ctype = _header(message.get("headers"), b"content-type")
                if status >= 400 and not ctype.startswith(b"application/json"):
                    held = {"status": status, "headers": message.get("headers") or [], "body": bytearray()}
                    return
                started = True
                await send(message)
            elif kind == "http.response.body" and held is not None:
                if len(held["body"]) < _MAX_ERROR_BODY:
                    held["body"] += message.get("body", b"")
                if not message.get("more_body", False):
                    status, reason, text = _classify(held["status"], held["body"].decode("utf-8", "replace"))
                    retry = _header(held["headers"], b"retry-after")
                    held, started = None, True
                    await send_error(send, status, reason, text,
                                     float(retry) if retry.isdigit() else DEFAULT_RETRY_AFTER_S)
            else:
                await send(message)

        try:
            await self.app(scope, receive, shaping_send)
        except Exception:
            logger.exception("proxy error on %s %s", scope.get("method"), scope.get("path"))
        if not started:  # Serve answered nothing: its replica died or the request failed in Ray
            await send_error(send, *_classify(500, "")[:3])


class LoadShedding(HttpMiddleware):
    """Refuse in the proxy, cheaply, the part of an overload the replicas would refuse anyway
    (``shedding.AdaptiveThrottle``). A shed request is a 503 ``overloaded`` in our shape with
    ``Retry-After`` and ``x-arcface-shed: proxy``."""

    def __init__(self, app, throttle: AdaptiveThrottle | None = None) -> None:
        super().__init__(app)
        self.throttle = throttle or AdaptiveThrottle.from_env()

    async def handle(self, scope, receive, send) -> None:
        if scope.get("method") != "POST" or not self.throttle.enabled:
            await self.app(scope, receive, send)
            return
        route = scope.get("path", "")
        if not self.throttle.admit(route):
            p = self.throttle.shed_probability(route)
            await send_error(send, 503, "overloaded",
                             f"the service is shedding load: its replicas refused most recent requests "
                             f"for capacity (this proxy now refuses {p:.0%} of them itself); retry later",
                             extra={"x-arcface-shed": "proxy"})
            return
        status = None
        client_left = False

        async def watching_send(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        async def watching_receive():
            nonlocal client_left
            message = await receive()
            if message["type"] == "http.disconnect" and status is None:
                client_left = True
            return message

        try:
            await self.app(scope, watching_receive, watching_send)
        finally:
            # a request its client abandoned says nothing about capacity: counted, whatever the
            # answer nobody reads (a 503 once its replica call is cut), anyone could make the
            # proxy refuse other clients by opening and dropping requests
            if status is not None and not client_left:
                self.throttle.record(route, status)


# -- gRPC -------------------------------------------------------------------------------------
def add_embedding_service(servicer, server) -> None:
    """Register ``arcface.v1.EmbeddingService`` on Serve's gRPC proxy (raw request bytes, our
    status format). On a plain ``grpc`` server it registers the same raw-bytes handlers."""
    import grpc

    from .protos import embedding_pb2 as pb

    responses = {"Embed": pb.EmbedResponse, "EmbedBatch": pb.EmbedResponse, "Health": pb.HealthResponse,
                 "Identify": pb.IdentifyResponse}
    handlers = {
        name: grpc.unary_unary_rpc_method_handler(
            getattr(servicer, name), request_deserializer=None,
            response_serializer=response.SerializeToString,
        )
        for name, response in responses.items()
    }
    service = pb.DESCRIPTOR.services_by_name["EmbeddingService"].full_name
    factory = getattr(server, "service_handler_factory", None)
    if factory is not None:
        server.service_handler_factory = _status_rewriting(factory)
    try:
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, handlers),))
        if hasattr(server, "add_registered_method_handlers"):
            server.add_registered_method_handlers(service, handlers)
    finally:
        if factory is not None:
            server.service_handler_factory = factory


def _status_rewriting(factory):
    from ray.serve._private.proxy_request_response import gRPCStreamingType

    def make(service_method: str, streaming_type):
        handler = factory(service_method=service_method, streaming_type=streaming_type)
        if streaming_type != gRPCStreamingType.UNARY_UNARY:
            return handler

        async def unary_unary(request, context):
            response = await handler(request, context)
            rewrite_grpc_status(context)
            return response

        return unary_unary

    return make


def rewrite_grpc_status(context) -> None:
    """Serve's own non-OK statuses -> ``UNAVAILABLE`` / clean details; ours pass unchanged."""
    import grpc

    code = context.code()
    if code in (None, grpc.StatusCode.OK, grpc.StatusCode.CANCELLED):
        return
    details = context.details()
    if isinstance(details, bytes):
        details = details.decode("utf-8", "replace")
    if is_our_grpc_details(details):
        return
    text = safe_text(details or "", limit=300)
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        code, reason, text = (grpc.StatusCode.UNAVAILABLE, "overloaded",
                              "the service is at capacity (the proxy's queue for it is full); retry later")
    elif code in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN):
        code, reason, text = (grpc.StatusCode.UNAVAILABLE, "replica_unavailable",
                              "the replica handling this request failed before answering; retry")
    elif code == grpc.StatusCode.UNAVAILABLE:
        reason = "unavailable"
    elif code == grpc.StatusCode.DEADLINE_EXCEEDED:
        reason = "timeout"
    elif code == grpc.StatusCode.NOT_FOUND:
        reason = "not_found"
    else:
        reason = "bad_request"
    context.set_code(code)
    context.set_details(f"{reason}: {text}")
