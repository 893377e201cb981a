"""The clients bound what a server can make them do: the sync client's whole exchange fits in
``timeout_s`` (a body trickled a byte at a time does not hold it), and neither client reads an
answer larger than ``max_answer_mb`` (a 4 GB ``Content-Length`` is refused unread). A real HTTP
server on 127.0.0.1 plays the hostile service."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from serve_app.client import AsyncEmbeddingClient, BadAnswer, EmbeddingClient, RetryPolicy, ServiceError

NO_RETRY = RetryPolicy(retries=0)


class _Hostile(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            getattr(self, "_" + self.path.strip("/"))()

    def _fine(self):
        body = b'{"status": "ok"}'
        self.send_response(200)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _chunked(self, size: int = 50_000):
        self.send_response(200)
        self.send_header("transfer-encoding", "chunked")
        self.end_headers()
        for _ in range(size // 1000):
            self.wfile.write(b"3e8\r\n" + b" " * 1000 + b"\r\n")
        self.wfile.write(b"0\r\n\r\n")

    def _small_chunked(self):
        self.send_response(200)
        self.send_header("transfer-encoding", "chunked")
        self.end_headers()
        self.wfile.write(b"10\r\n{\"status\": \"ok\"}\r\n0\r\n\r\n")

    def _huge(self):
        self.send_response(200)
        self.send_header("content-length", str(4 << 30))
        self.end_headers()
        self.wfile.write(b"{" * 1000)

    def _trickle(self):
        self.send_response(200)
        self.send_header("content-length", "100")
        self.end_headers()
        for _ in range(100):
            self.wfile.write(b" ")
            self.wfile.flush()
            time.sleep(0.3)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def hostile():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Hostile)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_the_sync_client_reads_whole_answers_plain_and_chunked(hostile):
    with EmbeddingClient(hostile) as client:
        assert client._send("GET", "/fine").json() == {"status": "ok"}
        assert client._send("GET", "/small_chunked").json() == {"status": "ok"}


def test_a_trickled_answer_ends_at_the_clients_deadline_not_the_servers_pace(hostile):
    started = time.monotonic()
    with EmbeddingClient(hostile, timeout_s=1.0, retry=NO_RETRY) as client, \
            pytest.raises(ServiceError) as info:
        client._send("GET", "/trickle")
    assert info.value.reason == "timeout" and "timeout_s=1" in info.value.message
    assert time.monotonic() - started < 15  # the whole body takes 30 s: it was not waited for


@pytest.mark.parametrize("path", ["/huge", "/chunked"])
def test_an_answer_over_max_answer_mb_is_refused(hostile, path):
    # /huge sends 1,000 of its declared 4 GiB and stops: reading it would never end
    with EmbeddingClient(hostile, max_answer_mb=0.01, retry=NO_RETRY) as client, \
            pytest.raises(BadAnswer, match="at most 10,485 are read"):
        client._send("GET", path)


@pytest.mark.parametrize("path", ["/huge", "/chunked"])
def test_the_async_client_refuses_an_answer_over_max_answer_mb(hostile, path):
    async def get():
        client = AsyncEmbeddingClient(hostile, max_answer_mb=0.01, retry=NO_RETRY)
        try:
            await client._send("GET", path)
        finally:
            await client.close()

    with pytest.raises(BadAnswer, match="at most 10,485 are read"):
        asyncio.run(get())


def test_the_async_client_gives_up_at_its_timeout(hostile):
    async def get():
        client = AsyncEmbeddingClient(hostile, timeout_s=1.0, retry=NO_RETRY)
        try:
            await client._send("GET", "/trickle")
        finally:
            await client.close()

    with pytest.raises(ServiceError) as info:
        asyncio.run(get())
    assert info.value.reason == "timeout"
