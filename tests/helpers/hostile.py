"""Crafted inputs an attacker (or an unlucky client) sends: small files that cost a decoder a
lot, files of formats outside the allow-list, raw bytes of a misleading length."""

from __future__ import annotations

import functools
import struct

import cv2
import numpy as np


def hdr_rle(width: int, height: int, rows: int | None = None) -> bytes:
    """A valid Radiance HDR (RGBE, new-style run-length encoded) of one flat colour: about
    830 bytes per scanline whatever the width, so 13000 x 13000 (5 GB for OpenCV to decode)
    fits in 10.8 MB. ``8 <= width < 32768`` (the RLE scanline format's range); ``rows``: write
    only that many scanlines (a file cut short, same header)."""
    assert 8 <= width < 0x8000
    runs, left = [], width
    while left:
        n = min(127, left)
        runs.append(bytes([128 + n, 0x80]))  # a run of n equal component values
        left -= n
    channel = b"".join(runs)
    scanline = bytes([2, 2, width >> 8, width & 0xFF]) + channel * 4  # R, G, B, E
    header = f"#?RADIANCE\nFORMAT=32-bit_rle_rgbe\n\n-Y {height} +X {width}\n".encode()
    return header + scanline * (height if rows is None else rows)


@functools.lru_cache(maxsize=4)
def truncated_jpeg(width: int = 6000, height: int = 6000) -> bytes:
    """A JPEG cut after its headers and a few bytes of scan: under 1 KB that still declares
    ``width`` x ``height`` (older OpenCV builds decoded, and filled, the whole canvas; 5.0
    gives up early, but the header is what a budget must read)."""
    ok, buf = cv2.imencode(".jpg", np.zeros((height, width, 3), np.uint8))
    assert ok
    data = buf.tobytes()
    return data[: data.index(b"\xff\xda") + 64]


@functools.lru_cache(maxsize=4)
def flat_png(width: int = 6000, height: int = 6000) -> bytes:
    """A complete, valid PNG of one flat colour: 105 KB for 6000 x 6000 (36 MP, 108 MB and
    about 0.4 s of one core to decode): the cheapest real decode work per byte of request."""
    ok, buf = cv2.imencode(".png", np.zeros((height, width, 3), np.uint8), [cv2.IMWRITE_PNG_COMPRESSION, 9])
    assert ok
    return buf.tobytes()


def bmp_opencv_raises_on() -> bytes:
    """A 1.9 KB BMP whose header declares 1,835,038 x 20 pixels: under any pixel limit, but
    wider than OpenCV's CV_IO_MAX_IMAGE_WIDTH, so ``cv2.imdecode`` raises ``cv2.error``."""
    ok, buf = cv2.imencode(".bmp", np.zeros((20, 30, 3), np.uint8))
    assert ok
    data = bytearray(buf.tobytes())
    data[20] = 28
    return bytes(data)


def pfm(width: int, height: int) -> bytes:
    """A PFM header (float RGB, little endian) declaring ``width`` x ``height``, data cut short."""
    return f"PF\n{width} {height}\n-1.0\n".encode() + struct.pack("<3f", 0.5, 0.5, 0.5) * 16


def pam(width: int, height: int) -> bytes:
    """A PAM (P7) header declaring ``width`` x ``height`` RGB, data cut short."""
    return (f"P7\nWIDTH {width}\nHEIGHT {height}\nDEPTH 3\nMAXVAL 255\nTUPLTYPE RGB\nENDHDR\n".encode()
            + b"\x80" * 64)


def gif_of_raw_crop_size() -> bytes:
    """A GIF padded to exactly 112*112*3 bytes: what the old service took for a raw crop."""
    head = b"GIF89a" + struct.pack("<HH", 112, 112) + b"\xf7\x00\x00"
    return (head + b"\x00" * (112 * 112 * 3))[: 112 * 112 * 3]
