"""Encoded image bytes -> BGR pixels, safely, for every caller that decodes untrusted files.

The online service and the offline job both decode images they did not make. Three rules,
in this order, so that no crafted file costs memory or crashes a worker:

1. **Formats by magic bytes**, from an allow-list (``ALLOWED_FORMATS``: JPEG, PNG, WebP,
   BMP, TIFF). OpenCV would also decode PPM/PAM/PFM, Radiance HDR, Sun raster and more,
   formats whose headers Pillow cannot read; those are refused here (``unsupported_format``,
   naming the format) instead of decoded without a size check; bytes like no image format
   at all are ``not_an_image``. A name or a content type says nothing; the first bytes do.
2. **The declared size before the decode**: decoding allocates width x height x 3 bytes
   whatever the file size (a few hundred bytes of PNG can declare a gigapixel image), so
   the header's width and height (read by Pillow, which parses headers lazily) are checked
   against ``max_pixels`` first.
3. **Every decoder failure is one error**: ``cv2.imdecode`` returns ``None`` for most bad
   data but raises ``cv2.error`` for some crafted BMP/TIFF headers; both become
   ``ImageRejected("not_an_image", ...)``, so a per-row or per-request error is all a bad
   file can cause.
"""

from __future__ import annotations

import io
import re
import struct

import cv2
import numpy as np

ALLOWED_FORMATS = ("jpeg", "png", "webp", "bmp", "tiff")
FORMAT_NAMES = "JPEG, PNG, WebP, BMP or TIFF"
DEFAULT_MAX_PIXELS = 40_000_000
# Pillow's name for each allowed format: the header it parsed must be of the format sniffed
_PILLOW_FORMATS = {"jpeg": "JPEG", "png": "PNG", "webp": "WEBP", "bmp": "BMP", "tiff": "TIFF"}


class ImageRejected(ValueError):
    """Bytes that are not decoded: ``reason`` is ``unsupported_format``, ``image_too_large``
    or ``not_an_image`` (a machine-readable tag: HTTP reason, job error column)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def sniff_format(data: bytes) -> str | None:
    """The allowed format ``data`` starts like, by its magic bytes; ``None`` for anything else."""
    if data.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    if data.startswith(b"BM"):
        return "bmp"
    if data.startswith((b"II*\x00", b"MM\x00*")):
        return "tiff"
    return None


# Image formats refused by name (415): what OpenCV or other decoders would read, and a
# caller may well send. Bytes like none of these and none of the allowed ones are no image.
_REFUSED_SIGNATURES: tuple[tuple[str, tuple[bytes, ...]], ...] = (
    ("GIF", (b"GIF87a", b"GIF89a")),
    ("PNM/PAM", tuple(b"P" + bytes([c]) for c in b"1234567")),
    ("PFM", (b"PF\n", b"Pf\n", b"PF\r", b"Pf\r", b"PF ", b"Pf ")),
    ("Radiance HDR", (b"#?RADIANCE", b"#?RGBE")),
    ("Sun raster", (b"\x59\xa6\x6a\x95",)),
    ("DDS", (b"DDS ",)),
    ("OpenEXR", (b"\x76\x2f\x31\x01",)),
    ("JPEG 2000", (b"\x00\x00\x00\x0cjP  ", b"\xff\x4f\xff\x51")),
    ("Photoshop", (b"8BPS",)),
    ("BigTIFF", (b"II+\x00", b"MM\x00+")),
)


def refused_format(data: bytes) -> str | None:
    """The name of a known image format outside the allow-list that ``data`` starts like."""
    for name, signatures in _REFUSED_SIGNATURES:
        if data.startswith(signatures):
            return name
    if data[4:8] == b"ftyp" and data[8:12] in (b"avif", b"avis", b"heic", b"heix", b"mif1"):
        return "HEIF/AVIF"
    return None


def declared_pixels(data: bytes, fmt: str) -> tuple[int, bool]:
    """``(width x height, exact)`` the header of ``data`` (of format ``fmt``) declares; no pixel
    is decoded.

    Beyond Pillow's own bomb ceiling it refuses to say the size: the ceiling is returned as a
    lower bound (``exact`` False), larger than any sane limit. A header Pillow cannot parse as
    ``fmt`` is ``ImageRejected("not_an_image")``: a file that lies about its format is no image.
    """
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data), formats=[_PILLOW_FORMATS[fmt]]) as im:  # header only
            width, height = im.size
    except Image.DecompressionBombError:
        return 2 * (Image.MAX_IMAGE_PIXELS or 0) + 1, False
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, struct.error) as exc:
        raise ImageRejected(
            "not_an_image",
            f"starts like {fmt.upper()} but its header is unreadable ({len(data)} bytes): {exc}",
        ) from None
    return int(width) * int(height), True


def check_image_header(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[str, int]:
    """Rules 1 and 2 without decoding: ``(format, declared width x height)`` of ``data``.

    Raises ``ImageRejected`` exactly as ``decode_image`` would before it decodes a pixel, so a
    caller can sum what a whole batch of files declares (a per-request decode budget) before
    paying for any of them. Costs a header parse: microseconds, whatever the declared size.
    """
    if not data:
        raise ImageRejected("not_an_image", "empty: 0 bytes")
    fmt = sniff_format(data)
    if fmt is None:
        other = refused_format(data)
        if other:
            raise ImageRejected(
                "unsupported_format", f"{other} images are not accepted; send {FORMAT_NAMES}"
            )
        raise ImageRejected(
            "not_an_image",
            f"bytes are not a {FORMAT_NAMES} image ({len(data)} bytes, first bytes {data[:8].hex()})",
        )
    pixels, exact = declared_pixels(data, fmt)
    if pixels > max_pixels:
        raise ImageRejected(
            "image_too_large",
            f"the {fmt.upper()} image declares {'' if exact else 'more than '}{pixels:,} pixels; "
            f"at most {max_pixels:,} are decoded",
        )
    return fmt, pixels


_OPENCV_PREFIX = re.compile(r"^OpenCV\([^)]*\)\s+\S+:\d+:\s*error:\s*")
_OPENCV_FUNCTION = re.compile(r"\s+in function '[^']*'$")


def opencv_reason(exc: Exception) -> str:
    """What an OpenCV error says, without its version, build path, source line and function
    (``OpenCV(4.x) /io/opencv/modules/imgcodecs/src/loadsave.cpp:75: error: (-215:...) ... in
    function '...'``): a client's error message names its input, not our build."""
    lines = str(exc).strip().splitlines() or [""]
    reason = _OPENCV_FUNCTION.sub("", _OPENCV_PREFIX.sub("", lines[-1].strip()))
    return reason[:200] or type(exc).__name__


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """``data`` (an encoded JPEG, PNG, WebP, BMP or TIFF) -> ``(H, W, 3)`` uint8 BGR.

    Raises ``ImageRejected`` naming why: not an allowed format, more than ``max_pixels``
    declared, or undecodable. Messages carry no position (callers add "images[3]: ...").
    """
    fmt, _ = check_image_header(data, max_pixels)
    try:
        image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    except cv2.error as exc:  # some crafted BMP / TIFF headers raise instead of returning None
        raise ImageRejected("not_an_image", f"{fmt.upper()} decoder error ({len(data)} bytes): "
                                            f"{opencv_reason(exc)}") from None
    if image is None:
        raise ImageRejected("not_an_image", f"bytes are not a decodable {fmt.upper()} image "
                                            f"({len(data)} bytes)")
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:  # IMREAD_COLOR promises it
        raise ImageRejected("not_an_image", f"decoded to {image.shape} {image.dtype}, not 8-bit BGR")
    return image
