"""Without Ray: bench-serve's load loop against a service that refuses everything (a real HTTP
server in this process answering 503 with Retry-After, in our error shape)."""

from __future__ import annotations

import asyncio
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from serve_app.load_bench import _load

INFO = {"service": {"max_faces_per_request": 64}, "contract": "arcemb-v1-test", "backend": "onnx"}


class RefusingService:
    """``GET /v1/info`` answers; every ``POST /v1/embed`` is 503 ``overloaded``, Retry-After 1."""

    def __init__(self) -> None:
        self.embeds = 0
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _answer(self, status: int, body: dict, headers: dict[str, str]) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                for key, value in {"content-type": "application/json", **headers}.items():
                    self.send_header(key, value)
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                self._answer(200, INFO, {})

            def do_POST(self):
                self.rfile.read(int(self.headers.get("content-length", 0)))
                owner.embeds += 1
                self._answer(503, {"error": {"reason": "overloaded", "message": "queue full"}},
                             {"retry-after": "1"})

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


def test_a_refused_client_waits_retry_after_instead_of_spinning():
    service = RefusingService()
    try:
        result, _, _ = asyncio.run(_load(service.url, concurrency=4, faces_per_request=2,
                                         duration_s=2.0, warmup_s=0.0, token=None))
    finally:
        service.server.shutdown()
    # each of the 4 clients is refused once, waits 1 s, is refused again, waits out the 2 s:
    # a handful of requests, where sending again at once makes thousands
    assert result.requests == 0 and result.faces == 0
    assert 4 <= result.errors["503"] <= 4 * 3, result.errors
    assert service.embeds == result.errors["503"]
