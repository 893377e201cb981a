"""Request decoding without Ray: every malformed input gets a precise 4xx."""

from __future__ import annotations

import base64
import io

import cv2
import numpy as np
import pytest

from engines.align import norm_crop
from engines.sample_faces import source_faces
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


def test_bad_json_body():
    with pytest.raises(RequestError) as info:
        decode_json_body(b"{not json")
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
