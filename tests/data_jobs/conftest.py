"""Fixtures of the job's tests: hostile image bytes and landmarks, an S3 endpoint that stalls."""

from __future__ import annotations

import socketserver
import threading
import time
from collections.abc import Iterator

import cv2
import numpy as np
import pytest
from support import png_bomb


def _encoded(ext: str, image: np.ndarray | None = None) -> bytes:
    ok, buf = cv2.imencode(ext, np.zeros((112, 112, 3), np.uint8) if image is None else image)
    assert ok
    return buf.tobytes()


def _opencv_raising_bmp() -> bytes:
    """A BMP header Pillow reads but whose width (1,835,038) makes cv2.imdecode raise cv2.error."""
    data = bytearray(_encoded(".bmp", np.zeros((20, 30, 3), np.uint8)))
    data[20] = 28
    with pytest.raises(cv2.error):
        cv2.imdecode(np.frombuffer(bytes(data), np.uint8), cv2.IMREAD_COLOR)
    return bytes(data)


@pytest.fixture(scope="session")
def hostile_inline() -> list[tuple[str, object, list | None, str, str]]:
    """(name, image value, kps, reason, words of the message) of rows the decode stage must turn
    into per-row errors, under a 40 MP / 50,000-byte limit: crafted headers OpenCV raises on or
    decodes without a size check, a declared 20000x20000 PNG, an oversized inline image, bad
    landmarks on a valid image, and values of the wrong type (which a manifest's type check
    refuses first, and the decode stage survives anyway)."""
    noise = np.random.default_rng(0).integers(0, 255, (160, 160, 3), dtype=np.uint8)
    crop = _encoded(".png")
    return [
        ("bmp_cv2_error", _opencv_raising_bmp(), None, "not_an_image", "decoder error"),
        ("pfm", _encoded(".pfm", np.zeros((20, 20, 3), np.float32)), None, "unsupported_format", "PFM"),
        ("hdr_13000", b"#?RADIANCE\nFORMAT=32-bit_rle_rgbe\n\n-Y 13000 +X 13000\n" + b"\0" * 64, None,
         "unsupported_format", "Radiance HDR"),
        ("pam", _encoded(".pam"), None, "unsupported_format", "PNM/PAM"),
        ("ppm", _encoded(".ppm"), None, "unsupported_format", "PNM/PAM"),
        ("dds", b"DDS |" + b"\0" * 124, None, "unsupported_format", "DDS"),
        ("tiff_header", b"II*\x00" + b"\xff" * 60, None, "not_an_image", "TIFF"),
        ("png_20000", png_bomb(20000, 20000), None, "image_too_large", "at most 40,000,000 are decoded"),
        ("inline_too_large", _encoded(".png", noise), None, "file_too_large", "at most 50,000"),
        ("kps_far_outside", crop, [5000.0, 50.0] * 5, "bad_landmarks", "far outside"),
        ("kps_huge", crop, [1e30] * 10, "bad_landmarks", "far outside"),
        ("kps_fractions", crop, [0.3, 0.4, 0.6, 0.4, 0.5, 0.6, 0.35, 0.8, 0.65, 0.8], "bad_landmarks",
         "degenerate"),
        ("kps_count", crop, [50.0] * 7, "bad_landmarks", "got 7 values"),
        ("kps_text", crop, ["x"] * 10, "bad_landmarks", "10 numbers"),
        ("str_image", "a string, not bytes", None, "decode_error", "TypeError"),
    ]

STALLED_OBJECT_BYTES = 10_000  # 83 minutes at the trickle's rate


class _StallingHandler(socketserver.StreamRequestHandler):
    """Answers HEAD at once (an object of ``STALLED_OBJECT_BYTES``), then sends a GET's body one
    byte every 0.5 s: fast enough for the S3 client's own low-speed abort (1 byte/s), slow
    enough that the object would take over an hour. What a hanging store looks like to a reader."""

    def handle(self) -> None:
        while not self.server.stopping.is_set():
            request = self.rfile.readline()
            if not request:
                return
            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                pass
            head = request.startswith(b"HEAD")
            self.wfile.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
                b"Content-Length: %d\r\nETag: \"stalled\"\r\n"
                b"Last-Modified: Mon, 01 Jan 2024 00:00:00 GMT\r\n\r\n" % STALLED_OBJECT_BYTES
            )
            self.wfile.flush()
            if head:
                continue
            for _ in range(STALLED_OBJECT_BYTES):
                if self.server.stopping.wait(0.5):
                    return
                try:
                    self.wfile.write(b"\0")
                    self.wfile.flush()
                except OSError:
                    return
            return


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _StallingHandler)
        self.stopping = threading.Event()


@pytest.fixture()
def stalled_s3() -> Iterator[str]:
    """``http://127.0.0.1:PORT`` of an S3-like endpoint whose every object read stalls."""
    server = _Server()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.stopping.set()
        server.shutdown()
        server.server_close()
        time.sleep(0.1)


@pytest.fixture
def s3_gate(s3_endpoint, aws_env) -> Iterator:
    """An endpoint in front of the real S3 server that holds the requests a test names until it
    lets them go (``tests/helpers/s3_gate.py``): how the fault tests stop a job at a known point."""
    from s3_gate import S3Gate

    gate = S3Gate(s3_endpoint)
    try:
        yield gate
    finally:
        gate.close()
