"""The error shape and its catch-alls as ASGI components, driven through the ASGI interface
with the messages Serve's proxy and a replica really send (no Ray here; the same components
run behind real Serve in test_service.py and test_arcface_serve.py)."""

from __future__ import annotations

import asyncio
import json
import random

import pytest

from serve_app.errors import REASONS, CatchAllMiddleware, RequestError, error_headers, safe_text
from serve_app.proxy_hooks import LoadShedding, ServeErrorShape
from serve_app.shedding import AdaptiveThrottle


def _run(middleware_cls, inner) -> list[dict]:
    """The messages ``middleware_cls(inner)`` sends for one POST."""
    sent: list[dict] = []

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/v1/embed", "headers": []}
    asyncio.run(middleware_cls(inner)(scope, receive, send))
    return sent


def _response(sent: list[dict]) -> tuple[int, dict[str, str], bytes]:
    start = next(m for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return start["status"], {k.decode(): v.decode() for k, v in start["headers"]}, body


def _plain(status: int, text: bytes, headers=()):
    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"text/plain; charset=utf-8"), *headers]})
        await send({"type": "http.response.body", "body": text})
    return app


@pytest.mark.parametrize(("inner", "status", "reason", "retry_after"), [
    # what Serve's proxy sends beyond max_queued_requests (backpressure_config.retry_after_s: 1)
    (_plain(503, b"Request dropped due to backpressure (num_queued_requests=65, max_queued_requests=64).",
            [(b"retry-after", b"3")]), 503, "overloaded", "3"),
    # ... without backpressure_config: Retry-After is added
    (_plain(503, b"Request dropped due to backpressure (num_queued_requests=2, max_queued_requests=1)."),
     503, "overloaded", "1"),
    (_plain(503, b"Deployment 'EmbeddingDeployment' is unavailable."), 503, "unavailable", "1"),
    (_plain(404, b"Path '/x' not found. Ping http://127.0.0.1:8000/-/routes for available routes."),
     404, "not_found", None),
    (_plain(408, b"Request abc timed out after 60.0s."), 408, "timeout", None),
])
def test_the_proxy_rewrites_serves_own_errors_into_our_shape(inner, status, reason, retry_after):
    code, headers, body = _response(_run(ServeErrorShape, inner))
    assert code == status and headers["content-type"] == "application/json"
    error = json.loads(body)["error"]
    assert (error["status"], error["reason"]) == (status, reason) and error["message"]
    assert headers.get("retry-after") == retry_after
    assert int(headers["content-length"]) == len(body)


def test_a_request_serve_answers_nothing_for_is_a_retryable_503():
    """A replica killed mid-request: Serve's proxy sends nothing (uvicorn would answer a bare
    500 text/plain)."""
    async def nothing(scope, receive, send):
        return None

    code, headers, body = _response(_run(ServeErrorShape, nothing))
    assert code == 503 and headers["retry-after"] == "1"
    assert json.loads(body)["error"]["reason"] == "replica_unavailable"


@pytest.mark.parametrize(("status", "ctype", "body"), [
    (200, b"application/x-npy", b"\x93NUMPY" + bytes(range(256))),
    (200, b"text/html; charset=utf-8", b"<html>docs</html>"),
    (422, b"application/json", b'{"error": {"status": 422, "reason": "bad_landmarks", "message": "x"}}'),
])
def test_answers_of_our_replicas_pass_the_proxy_untouched(status, ctype, body):
    async def replica(scope, receive, send):
        await send({"type": "http.response.start", "status": status, "headers": [(b"content-type", ctype)]})
        await send({"type": "http.response.body", "body": body[:10], "more_body": True})
        await send({"type": "http.response.body", "body": body[10:]})

    code, headers, got = _response(_run(ServeErrorShape, replica))
    assert (code, headers["content-type"].encode(), got) == (status, ctype, body)


def test_the_replica_catch_all_hides_the_exception():
    async def broken(scope, receive, send):
        raise KeyError("/work/secret/path.py pid=123")

    code, _, body = _response(_run(CatchAllMiddleware, broken))
    error = json.loads(body)["error"]
    assert code == 500 and error["reason"] == "internal" and "id " in error["message"]
    assert "secret" not in body.decode() and "pid" not in body.decode()


def test_messages_are_always_encodable():
    err = RequestError(409, "contract_mismatch", "contract '\ud800' differs")
    assert "\\ud800" in err.message
    json.dumps(err.to_dict(), ensure_ascii=False).encode("utf-8")  # what a JSON response does
    assert safe_text("x" * 5000, limit=100).endswith("[truncated]") and len(safe_text("x" * 5000, 100)) == 100


def test_every_reason_has_its_status_and_503s_say_when_to_retry():
    assert set(REASONS.values()) <= {400, 401, 403, 404, 405, 408, 409, 413, 415, 422, 500, 503}
    assert error_headers(503, 2.2) == {"Retry-After": "3"}
    assert error_headers(401) == {"WWW-Authenticate": "Bearer"}


# -- load shedding in the proxy ---------------------------------------------------------------
def test_the_throttle_lets_through_about_k_times_what_the_replicas_accept():
    """10x overload: 10 requests per tick, the replicas accept 1 per tick and refuse the rest.
    In steady state the proxy lets about k = 2 per tick through and sheds the other 8."""
    throttle = AdaptiveThrottle(k=2.0, window_s=4.0, rand=random.Random(0).random)
    throttle.record("/v1/embed", 200, now=0.0)  # the route has answered before
    passed = []
    for tick in range(400):  # 0.05 s per tick: 20 s, five windows
        now, accepted, through = tick * 0.05, 0, 0
        for _ in range(10):
            if throttle.admit("/v1/embed", now):
                through += 1
                throttle.record("/v1/embed", 200 if accepted == 0 else 503, now)
                accepted = 1
        passed.append(through)
    steady = passed[200:]
    assert 1.5 <= sum(steady) / len(steady) <= 3.0, sum(steady) / len(steady)
    # the overload ends: within one window nothing is shed any more
    later = 400 * 0.05
    throttle.record("/v1/embed", 200, now=later)
    assert throttle.shed_probability("/v1/embed", now=later + 4.0) == 0.0
    assert throttle.admit("/v1/embed", now=later + 4.1)


def test_a_burst_of_slow_accepted_requests_is_not_shed():
    """100 requests arrive at once on a busy replica that accepts them all but answers each only
    seconds later: none is shed (in flight is not refused), and once they are answered 200
    nothing is shed either."""
    throttle = AdaptiveThrottle(k=2.0, window_s=4.0, rand=lambda: 0.0)
    throttle.record("/v1/embed", 200, now=0.0)
    assert all(throttle.admit("/v1/embed", now=10.0) for _ in range(100))
    for i in range(100):
        throttle.record("/v1/embed", 200, now=12.0 + i * 0.01)
    assert throttle.shed_probability("/v1/embed", now=13.0) == 0.0


def test_refusals_count_as_requests_that_were_not_accepted():
    throttle = AdaptiveThrottle(k=2.0, window_s=4.0, rand=lambda: 0.0)
    throttle.record("/v1/embed", 200, now=0.0)
    for _ in range(20):
        throttle.record("/v1/embed", 503, now=1.0)
    # 21 answered, 1 accepted: (21 - 2) / 22
    assert throttle.shed_probability("/v1/embed", now=1.0) == pytest.approx(19 / 22)
    assert not throttle.admit("/v1/embed", now=1.0)  # rand() = 0 < p: shed, and counted
    assert throttle.shed_probability("/v1/embed", now=1.0) == pytest.approx(20 / 23)


def test_routes_that_never_answered_200_are_not_tracked():
    throttle = AdaptiveThrottle(k=2.0, rand=lambda: 0.0)
    for i in range(100):
        throttle.record(f"/random/{i}", 404, now=float(i))
        assert throttle.admit(f"/random/{i}", now=float(i))
    assert throttle.shed_probability("/random/1") == 0.0
    assert not AdaptiveThrottle.from_env({"ARCFACE_PROXY_SHED_K": "0"}).enabled
    assert AdaptiveThrottle.from_env({}).k == 2.0


def test_the_proxy_sheds_in_our_shape_once_replicas_refuse():
    answers = iter([200] + [503] * 1000)

    async def replica(scope, receive, send):
        status = next(answers)
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": b"{}"})

    middleware = LoadShedding(replica, AdaptiveThrottle(k=2.0, window_s=60.0, rand=lambda: 0.0))
    shed_headers = []
    for _ in range(50):
        sent = []

        async def send(message, sent=sent):
            sent.append(message)

        async def receive():
            return {"type": "http.request", "body": b"", "more_body": False}

        asyncio.run(middleware({"type": "http", "method": "POST", "path": "/v1/embed", "headers": []},
                               receive, send))
        code, headers, body = _response(sent)
        if headers.get("x-arcface-shed") == "proxy":
            assert code == 503 and json.loads(body)["error"]["reason"] == "overloaded"
            assert headers["retry-after"] == "1"
            shed_headers.append(headers)
    assert len(shed_headers) >= 45  # after the first refusals, nearly all are shed here


def test_requests_their_clients_abandon_do_not_make_the_proxy_shed():
    """Issue 30: 80 requests that send part of a body and close must leave the next good ones
    served; the answer to an abandoned request (a 503 once its replica call is cut) is not a
    refusal for capacity."""
    async def replica(scope, receive, send):
        message = await receive()
        status = 503 if message["type"] == "http.disconnect" else 200
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": b"{}"})

    throttle = AdaptiveThrottle(k=2.0, window_s=60.0, rand=lambda: 0.0)
    middleware = LoadShedding(replica, throttle)
    scope = {"type": "http", "method": "POST", "path": "/v1/embed", "headers": []}

    def call(first_message: dict) -> int:
        sent = []

        async def send(message):
            sent.append(message)

        async def receive():
            return first_message

        asyncio.run(middleware(scope, receive, send))
        return _response(sent)[0]

    good = {"type": "http.request", "body": b"x", "more_body": False}
    assert call(good) == 200  # the route is tracked from its first 200
    for _ in range(80):
        call({"type": "http.disconnect"})
    assert throttle.shed_probability("/v1/embed") == 0.0
    assert [call(good) for _ in range(30)] == [200] * 30
