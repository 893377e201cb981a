"""An S3 endpoint that holds chosen requests until the test lets them go: faults from outside.

A TCP relay on 127.0.0.1 in front of the real S3 server (moto). Each connection's request head is
read and checked against the gate's rules; a request that matches is held, before a byte reaches
the server, until the test calls :meth:`S3Gate.release`. Meanwhile the test observes that it is
held (:meth:`S3Gate.wait_held`) and does what a real failure would: SIGKILL the driver, the actor
or the commit task at that moment. Everything else is relayed as raw bytes both ways, so any
client (boto3, Arrow's S3 filesystem, Lance) talks the real protocol to the real server.

Each request is relayed on a connection of its own: the relay adds ``Connection: close`` to the
head (SigV4 does not sign that header), so the next request on the client's side arrives on a new
connection and meets the rules too.

Nothing in the production code knows about it: the job only sees an ``endpoint_url``.
"""

from __future__ import annotations

import contextlib
import re
import socket
import socketserver
import threading
import time
from dataclasses import dataclass, field
from urllib.parse import unquote, urlsplit

_HEAD_LIMIT = 64 << 10


@dataclass
class _Rule:
    method: str | None  # None: any
    path: re.Pattern
    times: int  # requests still to hold (the first ``times`` that match)
    held: list[str] = field(default_factory=list)
    clients: list[int] = field(default_factory=list)  # the held requests' client ports on 127.0.0.1
    seen: threading.Event = field(default_factory=threading.Event)


class S3Gate:
    """``url`` is the endpoint to give the client; :meth:`hold` adds a rule."""

    def __init__(self, upstream: str) -> None:
        parts = urlsplit(upstream)
        self._upstream = (parts.hostname or "127.0.0.1", parts.port or 80)
        self._rules: list[_Rule] = []
        self._open = threading.Event()
        self._lock = threading.Lock()
        self._server = _Server(self)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"

    def hold(self, path_pattern: str, method: str | None = None, times: int = 1_000_000) -> None:
        """Hold requests (of ``method``, or any) whose decoded path (``/bucket/key``) matches
        ``path_pattern`` (``re.search``): the first ``times`` of them, until :meth:`release`."""
        with self._lock:
            self._rules.append(_Rule(method and method.upper(), re.compile(path_pattern), times))

    def wait_held(self, timeout_s: float) -> list[str]:
        """Block until every rule has held at least one request; the paths held so far.
        ``timeout_s`` only bounds a test that is broken: the wait ends on the event."""
        for rule in self._rules:
            if not rule.seen.wait(timeout_s):
                raise TimeoutError(f"no {rule.method or 'request'} {rule.path.pattern} in {timeout_s} s")
        return self.held()

    def held(self) -> list[str]:
        with self._lock:
            return [p for rule in self._rules for p in rule.held]

    def held_client_ports(self) -> list[int]:
        """The local ports of the clients whose requests are held: ``processes.owner_of_port``
        names the process that sent each one."""
        with self._lock:
            return [port for rule in self._rules for port in rule.clients]

    def release(self) -> None:
        """Let every held request (and every later one) through."""
        self._open.set()

    def close(self) -> None:
        self._open.set()
        self._server.shutdown()
        self._server.server_close()

    def _gate(self, method: str, path: str, client_port: int) -> bool:
        """Whether this request was held (it returns once the gate is open)."""
        with self._lock:
            rule = next((r for r in self._rules if r.method in (None, method) and r.times > 0
                         and r.path.search(path)), None)
            if rule is None or self._open.is_set():
                return False
            rule.times -= 1
            rule.held.append(path)
            rule.clients.append(client_port)
            rule.seen.set()
        return True

    def _relay(self, client: socket.socket) -> None:
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = client.recv(65536)
            if not chunk or len(head) > _HEAD_LIMIT:
                return
            head += chunk
        head, rest = head.split(b"\r\n\r\n", 1)
        lines = head.split(b"\r\n")
        method, target = lines[0].decode("latin-1").split(" ")[:2]
        held = self._gate(method, unquote(urlsplit(target).path), client.getpeername()[1])
        kept = [line for line in lines[1:] if not line.lower().startswith(b"connection:")]
        head = b"\r\n".join([lines[0], *kept, b"Connection: close"]) + b"\r\n\r\n"
        if held and method == "GET":
            self._trickled_read(client, head + rest)
            return
        if held:
            _interim_until(client, self._open)
            rest, alive = _drain(client, rest)
            if not alive:  # killed while held: its request never reaches the store
                return
        try:
            upstream = socket.create_connection(self._upstream)
        except OSError:
            return
        with upstream:
            upstream.sendall(head + rest)
            threading.Thread(target=_pump, args=(client, upstream), daemon=True).start()
            _pump(upstream, client)

    def _trickled_read(self, client: socket.socket, request: bytes) -> None:
        """A held read: the store's answer, its head at once and its body a byte at a time (fast
        enough for the client's low-speed abort, which counts body bytes only) until the gate
        opens; then the rest. The last byte always waits for the gate."""
        with socket.create_connection(self._upstream) as upstream:
            upstream.sendall(request)
            answer = b""
            while chunk := upstream.recv(65536):
                answer += chunk
        head, _, body = answer.partition(b"\r\n\r\n")
        try:
            client.sendall(head + b"\r\n\r\n")
            sent = 0
            while sent < len(body) - 1 and not self._open.wait(0.25):
                client.sendall(body[sent : sent + 1])
                sent += 1
            self._open.wait()
            client.sendall(body[sent:])
        except OSError:
            return


_INTERIM = b"HTTP/1.1 102 Processing\r\n\r\n"


def _interim_until(client: socket.socket, gate_open: threading.Event) -> None:
    """Keep a held writer waiting without tripping its low-speed abort (the AWS SDK's curl gives
    up after 3 s under 1 byte/s): informational ``102 Processing`` answers, which HTTP/1.1 lets a
    server send before the final one, a byte at a time, until the gate opens."""
    sent = 0
    while True:
        if sent % len(_INTERIM) == 0 and gate_open.wait(0.25):
            return
        try:
            client.sendall(_INTERIM[sent % len(_INTERIM) : sent % len(_INTERIM) + 1])
        except OSError:
            gate_open.wait()
            return
        sent += 1
        if sent % len(_INTERIM):
            time.sleep(0.25)


def _drain(client: socket.socket, rest: bytes) -> tuple[bytes, bool]:
    """What the client sent while held, and whether it is still there (no end of stream)."""
    client.setblocking(False)
    try:
        while True:
            try:
                chunk = client.recv(65536)
            except BlockingIOError:
                return rest, True
            if not chunk:
                return rest, False
            rest += chunk
    except OSError:
        return rest, False
    finally:
        client.setblocking(True)


def _pump(src: socket.socket, dst: socket.socket) -> None:
    """Copy ``src`` to ``dst`` until ``src`` ends; then end ``dst``'s writing side."""
    try:
        while chunk := src.recv(65536):
            dst.sendall(chunk)
    except OSError:
        pass
    with contextlib.suppress(OSError):
        dst.shutdown(socket.SHUT_WR)


class _Handler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            self.server.gate._relay(self.request)


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, gate: S3Gate) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.gate = gate
