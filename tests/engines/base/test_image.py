"""Untrusted image bytes: allowed formats by magic bytes, declared size before decode, one error."""

from __future__ import annotations

import base64

import cv2
import numpy as np
import pytest
from support import png_bomb

from engines import ALLOWED_FORMATS, ImageRejected, check_landmarks, decode_image, load_tom_hanks

FACE = load_tom_hanks()


def _encoded(ext: str, image: np.ndarray = FACE) -> bytes:
    ok, buf = cv2.imencode(ext, image)
    assert ok
    return buf.tobytes()


@pytest.mark.parametrize("ext", [".jpg", ".png", ".webp", ".bmp", ".tiff"])
def test_every_allowed_format_decodes(ext):
    image = decode_image(_encoded(ext))
    assert image.shape == FACE.shape and image.dtype == np.uint8
    if ext in (".png", ".bmp", ".tiff"):  # lossless
        np.testing.assert_array_equal(image, FACE)
    assert len(ALLOWED_FORMATS) == 5


@pytest.mark.parametrize(("ext", "name"), [(".ppm", "PNM/PAM"), (".pfm", "PFM"), (".hdr", "Radiance HDR"),
                                           (".pam", "PNM/PAM"), (".sr", "Sun raster")])
def test_formats_opencv_would_decode_without_a_size_check_are_refused_by_name(ext, name):
    data = _encoded(ext, FACE.astype(np.float32) if ext == ".pfm" else FACE)
    assert cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR) is not None  # OpenCV would
    with pytest.raises(ImageRejected) as info:
        decode_image(data)
    assert info.value.reason == "unsupported_format" and name in str(info.value)


def test_a_huge_hdr_is_refused_before_anything_is_allocated():
    # 13000 x 13000 Radiance HDR: 14 MB of body, 5 GB decoded by OpenCV; refused at the magic bytes
    header = b"#?RADIANCE\nFORMAT=32-bit_rle_rgbe\n\n-Y 13000 +X 13000\n"
    with pytest.raises(ImageRejected) as info:
        decode_image(header + b"\x00" * 1024)
    assert info.value.reason == "unsupported_format"


@pytest.mark.parametrize("data", [
    b"", b"not an image at all", bytes(range(256)) * 3, b"\xff\xd8\xff" + b"\0" * 40,
    b"\x89PNG\r\n\x1a\n" + b"\x00" * 30, b"RIFF\0\0\0\0WEBPjunk",
])
def test_garbage_and_broken_headers_are_not_an_image(data):
    with pytest.raises(ImageRejected) as info:
        decode_image(data)
    assert info.value.reason == "not_an_image"


def test_declared_size_is_checked_before_decoding_every_format():
    bomb = png_bomb(6000, 6000)  # 36 MP declared in about 200 bytes
    with pytest.raises(ImageRejected, match="declares 36,000,000 pixels") as info:
        decode_image(bomb, max_pixels=20_000_000)
    assert info.value.reason == "image_too_large"
    with pytest.raises(ImageRejected, match="declares more than"):
        decode_image(png_bomb(200_000, 200_000))  # beyond Pillow's own ceiling too
    big = np.zeros((300, 300, 3), np.uint8)
    for ext in (".jpg", ".webp", ".bmp", ".tiff"):
        with pytest.raises(ImageRejected, match="declares 90,000 pixels"):
            decode_image(_encoded(ext, big), max_pixels=300 * 299)
        assert decode_image(_encoded(ext, big), max_pixels=300 * 300).shape == (300, 300, 3)


def test_a_truncated_jpeg_declaring_a_huge_canvas_is_refused_by_its_header():
    full = _encoded(".jpg", np.zeros((6000, 6000, 3), np.uint8))
    data = full[: full.index(b"\xff\xda") + 64]  # every header up to the scan, then a little scan data
    with pytest.raises(ImageRejected) as info:
        decode_image(data, max_pixels=1_000_000)
    assert info.value.reason == "image_too_large"


def test_a_header_opencv_raises_on_is_one_error_not_a_crash():
    # a 1.9 KB BMP declaring 1,835,038 x 20 pixels: under the pixel limit, but wider than OpenCV's
    # CV_IO_MAX_IMAGE_WIDTH, so cv2.imdecode raises cv2.error instead of returning None
    data = bytearray(_encoded(".bmp", np.zeros((20, 30, 3), np.uint8)))
    data[20] = 28
    with pytest.raises(cv2.error):
        cv2.imdecode(np.frombuffer(bytes(data), np.uint8), cv2.IMREAD_COLOR)
    with pytest.raises(ImageRejected) as info:
        decode_image(bytes(data))
    assert info.value.reason == "not_an_image" and "decoder error" in str(info.value)


def test_base64_of_a_refused_format_is_still_refused():
    data = base64.b64decode(base64.b64encode(_encoded(".ppm")))
    with pytest.raises(ImageRejected, match="PNM"):
        decode_image(data)


@pytest.mark.parametrize(
    ("landmarks", "message"),
    [
        ([[1e300, 1e300]] * 5, "far outside"),
        ([[5000.0, 50.0], [5040.0, 50.0], [5020.0, 70.0], [5005.0, 90.0], [5035.0, 90.0]], "far outside"),
        ([[0.3, 0.4], [0.6, 0.4], [0.5, 0.6], [0.35, 0.8], [0.65, 0.8]], "degenerate"),
        ([[-90.0, 10.0], [-80.0, 10.0], [-85.0, 20.0], [-88.0, 30.0], [-82.0, 30.0]], "face centre"),
        ([[float("nan"), 1.0]] * 5, "NaN"),
        ([[1.0, 2.0]] * 4, "shape"),
    ],
)
def test_landmark_rules_shared_by_the_service_and_the_job(landmarks, message):
    with pytest.raises(ValueError, match=message):
        check_landmarks(np.asarray(landmarks), (112, 112, 3))


def test_landmarks_of_a_real_face_pass():
    from engines import source_faces

    for face in source_faces():
        check_landmarks(face.landmarks, face.image.shape)


def test_an_opencv_error_is_told_without_its_build_path():
    import cv2

    from engines.base.image import opencv_reason

    exc = cv2.error("OpenCV(4.12.0) /io/opencv/modules/imgcodecs/src/loadsave.cpp:75: error: "
                    "(-215:Assertion failed) pixels <= CV_IO_MAX_IMAGE_PIXELS "
                    "in function 'validateInputImageSize'\n")
    assert opencv_reason(exc) == "(-215:Assertion failed) pixels <= CV_IO_MAX_IMAGE_PIXELS"
    assert opencv_reason(cv2.error("")) == "error"
