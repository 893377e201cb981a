"""Request decoding without Ray: every malformed input gets a precise 4xx."""

from __future__ import annotations

import base64
import io
import re

import cv2
import numpy as np
import pytest

from engines.base.align import norm_crop
from engines.models.sample_faces import source_faces
from serve_app.codec import (
    Limits,
    RequestError,
    decode_embed_json,
    decode_face_spec,
    decode_grpc_faces,
    decode_json_body,
    decode_npy,
    encode_npy,
)
from serve_app.protos import embedding_pb2 as pb

LIMITS = Limits(max_faces=8, max_body_bytes=1 << 20)


def _b64(image: np.ndarray, ext: str = ".png") -> str:
    return base64.b64encode(cv2.imencode(ext, image)[1].tobytes()).decode()


def _npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


def test_npy_round_trip(faces):
    out = decode_npy(encode_npy(faces[:3]), LIMITS)
    assert out.dtype == np.uint8 and np.array_equal(out, faces[:3])


@pytest.mark.parametrize(
    ("body", "status", "reason"),
    [
        (b"not an npy", 400, "bad_npy"),
        (_npy(np.zeros((2, 112, 112, 3), np.float32)), 422, "bad_dtype"),
        (_npy(np.zeros((2, 112, 112), np.uint8)), 422, "bad_shape"),
        (_npy(np.zeros((2, 64, 64, 3), np.uint8)), 422, "bad_shape"),
        (_npy(np.zeros((0, 112, 112, 3), np.uint8)), 422, "empty"),
        (_npy(np.zeros((9, 112, 112, 3), np.uint8)), 413, "too_many_faces"),
    ],
)
def test_bad_npy_bodies(body, status, reason):
    with pytest.raises(RequestError) as info:
        decode_npy(body, LIMITS)
    assert (info.value.status, info.value.reason) == (status, reason)
    assert info.value.message


def test_json_aligned_crops_decode_losslessly(faces):
    crops = decode_embed_json({"images": [_b64(f) for f in faces[:3]]}, LIMITS)
    assert np.array_equal(crops, faces[:3])


def test_json_landmarks_align_on_the_server():
    face = source_faces()[2]
    crops = decode_embed_json(
        {"images": [_b64(face.image)], "landmarks": [face.landmarks.tolist()]}, LIMITS
    )
    assert np.array_equal(crops[0], norm_crop(face.image, face.landmarks))


@pytest.mark.parametrize(
    ("payload", "status", "reason", "fragment"),
    [
        ({"images": ["@@@"]}, 400, "bad_base64", "images[0]"),
        ({"images": [base64.b64encode(b"hello").decode()]}, 422, "not_an_image", "images[0]"),
        ({"images": []}, 422, "empty", "no faces"),
        ({"images": ["x"] * 9}, 413, "too_many_faces", "limit is 8"),
        ({"pictures": []}, 422, "bad_request", "unknown field"),
        ({"images": "abc"}, 422, "bad_request", "must be a list"),
        ([1, 2], 422, "bad_request", "object"),
    ],
)
def test_bad_json_requests(payload, status, reason, fragment):
    with pytest.raises(RequestError) as info:
        decode_embed_json(payload, LIMITS)
    assert (info.value.status, info.value.reason) == (status, reason)
    assert fragment in info.value.message


def test_landmark_errors_name_the_item():
    face = source_faces()[0]
    image = _b64(face.image, ".jpg")
    with pytest.raises(RequestError, match=r"landmarks\[0\].*shape \(4, 2\)") as info:
        decode_embed_json({"images": [image], "landmarks": [[[1, 2]] * 4]}, LIMITS)
    assert info.value.reason == "bad_landmarks"
    with pytest.raises(RequestError, match="one entry per image"):
        decode_embed_json({"images": [image, image], "landmarks": [face.landmarks.tolist()]}, LIMITS)
    with pytest.raises(RequestError, match="1280x886; aligned crops must be 112x112"):
        decode_embed_json({"images": [image]}, LIMITS)


FACE = source_faces()[0]  # a 1280x886 photo and its detector landmarks
KPS = FACE.landmarks.tolist()
PIXEL = np.zeros((1, 1, 3), np.uint8)

# (id, landmarks, image, fragment of the message): each reaches norm_crop's ValueError,
# overflows its float32 transform, or warps nothing but border if not refused first
BAD_LANDMARKS = [
    ("identical points", [[50, 50]] * 5, FACE.image, "degenerate: the 5 points span only 0 x 0 px"),
    ("sub-pixel spread", [[50 + 1e-4 * i, 50] for i in range(5)], FACE.image, "span only 0.0004 x 0 px"),
    ("fractions", [[0.1, 0.1], [0.9, 0.1], [0.5, 0.5], [0.2, 0.8], [0.8, 0.8]], FACE.image,
     "not fractions of the image size"),
    ("nan", [[float("nan"), 1], *KPS[1:]], FACE.image, r"landmarks\[0\]\[0\]\[0\] \(left eye x\) is nan"),
    ("inf", [*KPS[:2], [1, float("inf")], *KPS[3:]], FACE.image, r"\[2\]\[1\] \(nose tip y\) is inf"),
    ("int beyond float", [[10**400, 1], *KPS[1:]], FACE.image, "integer of 401 digits"),
    ("strings", [["a", "b"]] * 5, FACE.image, "must be a number, got str 'a'"),
    ("bools", [[True, False]] * 5, FACE.image, "must be a number, got bool"),
    ("null coordinate", [*KPS[:4], [1, None]], FACE.image,
     r"\(right mouth corner y\) must be a number, got NoneType"),
    ("object", {"x": 1}, FACE.image, "got dict"),
    ("short pair", [KPS[0], [3], *KPS[2:]], FACE.image, r"\[1\] \(right eye\) must be an \[x, y\] pair"),
    ("far outside", [[x + 1e6, y] for x, y in KPS], FACE.image,
     r"landmark 0 \(left eye\) at \(1.00008e\+06, 332\) is far outside the 1280x886 image"),
    ("float32 overflow", [[x * 1e30, y * 1e30] for x, y in KPS], FACE.image, "far outside"),
    ("face beside the image", [[x + 1200, y] for x, y in KPS], FACE.image,
     r"face centre \(mean of the 5 landmarks\) at \(1319.6, 341\) is outside"),
    ("1x1 image", KPS, PIXEL, "far outside the 1x1 image"),
    ("1x1 image, points inside", [[0, 0], [0.9, 0], [0.5, 0.5], [0, 0.9], [0.9, 0.9]], PIXEL,
     "span only 0.9"),
]


@pytest.mark.parametrize(("landmarks", "image", "fragment"), [c[1:] for c in BAD_LANDMARKS],
                         ids=[c[0] for c in BAD_LANDMARKS])
def test_landmarks_that_describe_no_face_are_422(landmarks, image, fragment):
    decoders = [
        lambda: decode_embed_json({"images": [_b64(image)], "landmarks": [landmarks]}, LIMITS),
        lambda: decode_face_spec({"image": _b64(image), "landmarks": landmarks}, "a", LIMITS),
    ]
    flat = np.asarray(landmarks, dtype=object).ravel() if isinstance(landmarks, list) else []
    if len(flat) == 10 and all(isinstance(v, (int, float)) and abs(v) < 1e38 for v in flat):
        face = pb.Face(image=cv2.imencode(".png", image)[1].tobytes(), landmarks=list(flat))
        decoders.append(lambda: decode_grpc_faces([face], b"", LIMITS))  # float32 on the wire
    for decode in decoders:
        with pytest.raises(RequestError) as info:
            decode()
        assert (info.value.status, info.value.reason) == (422, "bad_landmarks")
        if decode is decoders[0]:
            assert re.search(fragment, info.value.message), info.value.message


def test_landmarks_near_the_border_and_tiny_images_still_align():
    """A face cut by the border has points just outside the image: still insightface's crop."""
    shifted = FACE.landmarks - [100, 0]  # left eye at x = -15
    crops = decode_embed_json({"images": [_b64(FACE.image)], "landmarks": [shifted.tolist()]}, LIMITS)
    assert np.array_equal(crops[0], norm_crop(FACE.image, shifted))
    flat = [FACE.landmarks.ravel().tolist()]  # 10 numbers, as gRPC sends them
    crops = decode_embed_json({"images": [_b64(FACE.image)], "landmarks": flat}, LIMITS)
    assert np.array_equal(crops[0], norm_crop(FACE.image, FACE.landmarks))
    spread = [[0, 0], [1, 0], [0.5, 0.5], [0, 1], [1, 1]]  # 1 px apart: tiny but well defined
    crops = decode_embed_json({"images": [_b64(PIXEL)], "landmarks": [spread]}, LIMITS)
    assert crops.shape == (1, 112, 112, 3)


@pytest.mark.parametrize(
    ("body", "fragment"),
    [(b"{not json", "Expecting property name"), (b"[" * 100_000, "nested too deeply"),
     (b'{"images": ' + b"9" * 5000 + b"}", "4300 digits"), (b"\xff\xfe\x00", "not valid JSON")],
)
def test_bad_json_body(body, fragment):
    with pytest.raises(RequestError, match=fragment) as info:
        decode_json_body(body)
    assert info.value.reason == "bad_json" and info.value.status == 400


def test_compare_specs(faces):
    crop, vec = decode_face_spec({"image": _b64(faces[0])}, "a", LIMITS)
    assert vec is None and np.array_equal(crop, faces[0])
    crop, vec = decode_face_spec({"embedding": [0.5] * 512}, "b", LIMITS)
    assert crop is None and vec.shape == (512,)
    cases = [
        ({}, "exactly one"),
        ({"embedding": [0.0] * 4}, "non-zero"),
        ({"embedding": "x"}, "list of numbers"),
        ({"embedding": [[1.0, 2.0]]}, "flat list"),
        ({"embedding": [10**400] * 4}, "list of numbers"),
        ({"embedding": [float("nan")] * 4}, "finite"),
        ({"image": 3}, "base64 string"),
    ]
    for spec, fragment in cases:
        with pytest.raises(RequestError, match=fragment):
            decode_face_spec(spec, "a", LIMITS)


def test_grpc_inputs(faces):
    out = decode_grpc_faces([], faces[:2].tobytes(), LIMITS)
    assert np.array_equal(out, faces[:2])
    encoded = [pb.Face(image=cv2.imencode(".png", f)[1].tobytes()) for f in faces[:2]]
    assert np.array_equal(decode_grpc_faces(encoded, b"", LIMITS), faces[:2])
    with pytest.raises(RequestError, match="37632 bytes"):
        decode_grpc_faces([], b"abc", LIMITS)
    with pytest.raises(RequestError, match="not both"):
        decode_grpc_faces(encoded, faces[:1].tobytes(), LIMITS)


def test_declared_image_size_is_checked_before_decoding():
    from support import png_bomb

    from serve_app.codec import decode_image_bytes

    bomb = png_bomb(6000, 6000)  # 36 MP, 108 MB decoded, about 200 bytes here
    assert len(bomb) < 1000
    with pytest.raises(RequestError) as info:
        decode_embed_json({"images": [base64.b64encode(bomb).decode()], "aligned": True},
                          Limits(max_image_pixels=20_000_000))
    assert (info.value.status, info.value.reason) == (413, "image_too_large")
    assert "declares 36,000,000 pixels" in str(info.value)
    with pytest.raises(RequestError, match="declares more than"):
        decode_image_bytes(png_bomb(200_000, 200_000), "x")  # beyond Pillow's own ceiling too
    small = Limits(max_image_pixels=100 * 100)
    with pytest.raises(RequestError, match="declares 12,544 pixels"):
        decode_image_bytes(base64.b64decode(_b64(np.zeros((112, 112, 3), np.uint8))), "x",
                           small.max_image_pixels)
    assert decode_image_bytes(base64.b64decode(_b64(np.zeros((112, 112, 3), np.uint8))), "x").shape == (
        112, 112, 3)
