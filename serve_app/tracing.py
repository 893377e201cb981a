"""Tracing: Ray Serve's OpenTelemetry tracing, exported over OTLP, with the service's own spans.

Serve traces each request through its proxy and replica when ``tracing_config`` in the deploy
config (``config/serve.yaml``) enables it; ``exporter_import_path`` names
``otlp_span_processors``, which sends the spans over OTLP/HTTP to the collector at
``$OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` (or ``$OTEL_EXPORTER_OTLP_ENDPOINT`` + ``/v1/traces``;
OpenTelemetry's own variables, default ``http://localhost:4318/v1/traces``). Inside Serve's
replica span the replica adds, per request:

- ``arcface.decode``: decoding and aligning the request's images (attribute ``arcface.images``);
- ``arcface.queue``: one per chunk, from entering the batch queue to its batch starting
  (``arcface.faces``; ``arcface.dropped`` when it waited past ``max_queue_wait_s``);
- ``arcface.encode``: the engine call of a batch (``arcface.batch_faces``, ``arcface.chunks``),
  under the first chunk's request and linked to every request whose faces it carried.

With tracing off, the API's no-op tracer makes each of these a few attribute lookups.
"""

from __future__ import annotations

import time
from contextlib import AbstractContextManager, nullcontext
from typing import Any

TRACER_NAME = "serve_app"


def otlp_span_processors() -> list:
    """Serve's ``tracing_config.exporter_import_path``: called with no arguments in every proxy
    and replica once tracing is set up there; the endpoint comes from the OTLP variables above."""
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    return [BatchSpanProcessor(OTLPSpanExporter(), schedule_delay_millis=1000)]


def _tracer():
    from opentelemetry import trace

    return trace.get_tracer(TRACER_NAME)


def current_context() -> Any:
    """The caller's trace context, to parent spans made later (in the batch handler)."""
    from opentelemetry import context

    return context.get_current()


def now_ns() -> int:
    return time.time_ns()


def decode_span(images: int) -> AbstractContextManager:
    if not images:  # crops only: nothing decoded
        return nullcontext()
    return _tracer().start_as_current_span("arcface.decode", attributes={"arcface.images": images})


def record_queue(items: list, keep: list[bool], batch_start_ns: int) -> None:
    """One ``arcface.queue`` span per chunk of the batch, ending when the batch started."""
    tracer = _tracer()
    for item, kept in zip(items, keep, strict=True):
        if item.trace_context is None:
            continue
        span = tracer.start_span("arcface.queue", context=item.trace_context, start_time=item.enqueued_ns,
                                 attributes={"arcface.faces": len(item.faces), "arcface.dropped": not kept})
        span.end(end_time=batch_start_ns)


def encode_span(items: list, faces: int) -> AbstractContextManager:
    """The engine call of a batch, linked to each request it serves."""
    from opentelemetry import trace

    links = []
    for item in items:
        ctx = trace.get_current_span(item.trace_context).get_span_context() if item.trace_context else None
        if ctx is not None and ctx.is_valid:
            links.append(trace.Link(ctx))
    parent = items[0].trace_context if items and items[0].trace_context is not None else None
    return _tracer().start_as_current_span("arcface.encode", context=parent, links=links,
                                           attributes={"arcface.batch_faces": faces,
                                                       "arcface.chunks": len(items)})
