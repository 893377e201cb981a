"""Request decoding and response encoding, shared by the HTTP and gRPC paths.

No Ray and no web framework in here: every function takes bytes or plain
Python objects and returns aligned ``(N, 112, 112, 3)`` uint8 crops, or raises
``RequestError`` carrying the HTTP status, a short machine-readable reason
(also the ``reason`` tag of the rejected-requests metric) and a message that
says what was wrong with which item.

Decoding is in two steps, so that the expensive one can be bounded and scheduled fairly:
``plan_*`` checks the structure, decodes base64 and reads each image's **header** (format
allow-list, declared size; microseconds per image), then checks the request's total declared
pixels against ``max_request_pixels``; only then does ``FaceJob.run`` decode and align one
image (the replica runs those jobs on its fair decode queue, ``decode_queue``). Raw crops are
taken only where the request says so (an ``.npy`` body, JSON ``crops``, gRPC ``Face.crop`` or
``EmbedBatchRequest.crops``), never guessed from a byte count.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import numbers
from dataclasses import dataclass
from typing import Any

import numpy as np

from engines import FACE_SIZE, LANDMARK_NAMES, ImageRejected, check_image_header, decode_image, norm_crop
from engines import check_landmarks as engine_check_landmarks

from .errors import RequestError
from .protos import embedding_pb2 as pb

RAW_CROP_BYTES = FACE_SIZE * FACE_SIZE * 3
NPY_MEDIA_TYPE = "application/x-npy"
_RAW_HINT = ("a raw 112x112x3 BGR crop must be declared as one: JSON 'crops', gRPC Face.crop or "
             "EmbedBatchRequest.crops, or an application/x-npy body")

__all__ = ["NPY_MEDIA_TYPE", "RAW_CROP_BYTES", "FaceJob", "Limits", "RequestError"]


@dataclass(frozen=True)
class Limits:
    """Per-request bounds; bodies beyond them are refused before they cost memory."""

    max_faces: int = 256
    max_body_bytes: int = 16 << 20
    # decoded size: a few KB of PNG can declare a gigapixel image (a decompression bomb)
    max_image_pixels: int = 40_000_000
    # decode work of one request: the sum over its images (256 truncated JPEGs of a few hundred
    # bytes each can declare 6000x6000: 9.2 gigapixels of decode for a 230 KB body)
    max_request_pixels: int = 100_000_000


def check_face_count(n: int, limits: Limits) -> None:
    if n == 0:
        raise RequestError(422, "empty", "no faces in the request; send at least one image or crop")
    if n > limits.max_faces:
        raise RequestError(
            413,
            "too_many_faces",
            f"{n} faces in one request, the limit is {limits.max_faces}; split the request",
        )


def decode_npy(body: bytes, limits: Limits) -> np.ndarray:
    """An ``.npy`` body holding ``(N, 112, 112, 3)`` uint8 BGR crops."""
    try:
        array = np.load(io.BytesIO(body), allow_pickle=False)
    except Exception as exc:
        raise RequestError(
            400, "bad_npy", f"body is not a valid .npy array (np.save format): {exc}"
        ) from None
    if not isinstance(array, np.ndarray):
        raise RequestError(400, "bad_npy", "body must hold one array, not an .npz archive")
    if array.dtype != np.uint8:
        raise RequestError(
            422, "bad_dtype", f"crops must be uint8 BGR, got dtype {array.dtype}"
        )
    if array.ndim != 4 or array.shape[1:] != (FACE_SIZE, FACE_SIZE, 3):
        raise RequestError(
            422,
            "bad_shape",
            f"crops must have shape (N, {FACE_SIZE}, {FACE_SIZE}, 3), got {array.shape}",
        )
    check_face_count(array.shape[0], limits)
    return np.ascontiguousarray(array)


def encode_npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


# HTTP status of each reason a file is not decoded (see engines.decode_image)
_IMAGE_STATUS = {"unsupported_format": 415, "image_too_large": 413, "not_an_image": 422}


def _image_error(exc: ImageRejected, where: str, data: bytes) -> RequestError:
    suffix = " (max_image_megapixels)" if exc.reason == "image_too_large" else ""
    if exc.reason == "not_an_image" and len(data) == RAW_CROP_BYTES:
        suffix = f"; {len(data)} bytes is the size of a raw crop: {_RAW_HINT}"
    return RequestError(_IMAGE_STATUS[exc.reason], exc.reason, f"{where}: {exc}{suffix}")


def read_image_header(data: bytes, where: str, max_pixels: int = Limits.max_image_pixels) -> int:
    """The declared pixels of an encoded image (format and size checked, nothing decoded)."""
    try:
        return check_image_header(data, max_pixels)[1]
    except ImageRejected as exc:
        raise _image_error(exc, where, data) from None


def decode_image_bytes(data: bytes, where: str, max_pixels: int = Limits.max_image_pixels) -> np.ndarray:
    """Encoded JPEG / PNG / WebP / BMP / TIFF -> BGR uint8 image (never a raw crop: see module doc).

    ``engines.decode_image`` does the work: formats by magic bytes from an allow-list, the
    header's declared size checked before anything is allocated, every decoder failure one
    error; here each refusal becomes its 4xx (415 format, 413 size, 422 undecodable).
    """
    try:
        return decode_image(data, max_pixels)
    except ImageRejected as exc:
        raise _image_error(exc, where, data) from None


def raw_crop(data: bytes, where: str) -> np.ndarray:
    """Exactly ``112*112*3`` bytes, C order, BGR -> one crop."""
    if len(data) != RAW_CROP_BYTES:
        raise RequestError(
            422, "bad_crop",
            f"{where}: a raw crop is {RAW_CROP_BYTES} bytes ((112, 112, 3) uint8 BGR), got {len(data)}",
        )
    return np.frombuffer(data, np.uint8).reshape(FACE_SIZE, FACE_SIZE, 3).copy()


@dataclass
class FaceJob:
    """One face of a request: an encoded image still to decode (and align on ``landmarks``),
    or a ``crop`` that is ready. ``pixels``: what the image header declares (0 for a crop)."""

    where: str
    data: bytes | None = None
    landmarks: np.ndarray | None = None
    crop: np.ndarray | None = None
    pixels: int = 0
    max_pixels: int = Limits.max_image_pixels

    def run(self) -> np.ndarray:
        """The crop: decode + align (the expensive step; a plain function for a worker thread)."""
        if self.crop is not None:
            return self.crop
        image = decode_image_bytes(self.data, self.where, self.max_pixels)
        return to_crop(image, self.landmarks, self.where)


def image_job(data: bytes, landmarks: np.ndarray | None, where: str, limits: Limits) -> FaceJob:
    pixels = read_image_header(data, where, limits.max_image_pixels)
    return FaceJob(where, data=data, landmarks=landmarks, pixels=pixels, max_pixels=limits.max_image_pixels)


def check_request_pixels(jobs: list[FaceJob], limits: Limits) -> list[FaceJob]:
    """The per-request decode budget: the images' declared sizes, summed, before any decode."""
    total = sum(job.pixels for job in jobs)
    if total > limits.max_request_pixels:
        raise RequestError(
            413, "request_too_large",
            f"the request's {sum(1 for j in jobs if j.pixels)} images declare {total:,} pixels in total; "
            f"at most {limits.max_request_pixels:,} are decoded per request (max_request_megapixels): "
            "split it, or send aligned crops",
        )
    return jobs


def run_jobs(jobs: list[FaceJob]) -> np.ndarray:
    """All crops of ``jobs`` in order, decoded here and now (tests, simple callers; the replica
    runs the jobs on its fair decode queue instead)."""
    out = np.empty((len(jobs), FACE_SIZE, FACE_SIZE, 3), np.uint8)
    for i, job in enumerate(jobs):
        out[i] = job.run()
    return out


def decode_base64(text: Any, where: str) -> bytes:
    if not isinstance(text, str):
        raise RequestError(400, "bad_base64", f"{where}: expected a base64 string, got {type(text).__name__}")
    if text.startswith("data:") and "," in text:  # data:image/png;base64,....
        text = text.split(",", 1)[1]
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise RequestError(400, "bad_base64", f"{where}: invalid base64: {exc}") from None


def is_number(value: Any) -> bool:
    """A real number from a JSON body or a message (``bool`` is an ``int`` to Python, not here)."""
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))


def parse_landmarks(value: Any, where: str) -> np.ndarray:
    """5 ``[x, y]`` pairs (or 10 flat numbers), each a finite number -> ``(5, 2)`` float64.

    Only the structure is checked here (cheap, before the image is decoded);
    ``check_landmarks`` checks them against the image once its size is known.
    """
    if isinstance(value, np.ndarray):
        value = value.tolist()
    points = value
    if isinstance(points, (list, tuple)) and len(points) == 10 and not any(
        isinstance(v, (list, tuple)) for v in points
    ):
        points = [points[i : i + 2] for i in range(0, 10, 2)]
    if not (isinstance(points, (list, tuple)) and len(points) == 5):
        raise RequestError(
            422,
            "bad_landmarks",
            f"{where}: expected 5 landmarks of [x, y] (shape (5, 2)) or 10 numbers, got "
            f"{_describe_shape(value)}",
        )
    for i, point in enumerate(points):
        if not (isinstance(point, (list, tuple)) and len(point) == 2):
            raise RequestError(
                422,
                "bad_landmarks",
                f"{where}[{i}] ({LANDMARK_NAMES[i]}) must be an [x, y] pair, got {point!r:.40}",
            )
    coords = np.empty((5, 2), np.float64)
    for i, point in enumerate(points):
        for j, v in enumerate(point):
            if not is_number(v):
                raise RequestError(
                    422,
                    "bad_landmarks",
                    f"{where}[{i}][{j}] ({LANDMARK_NAMES[i]} {'xy'[j]}) must be a number, "
                    f"got {type(v).__name__} {v!r:.40}",
                )
            try:
                coords[i, j] = float(v)
                problem = None if np.isfinite(coords[i, j]) else f"is {v!r}"
            except OverflowError:  # an integer beyond float range
                problem = f"is an integer of {len(str(v))} digits"
            if problem:
                raise RequestError(
                    422,
                    "bad_landmarks",
                    f"{where}[{i}][{j}] ({LANDMARK_NAMES[i]} {'xy'[j]}) {problem}; "
                    "landmarks must be finite pixel coordinates (no NaN or infinity)",
                )
    return coords


def _describe_shape(value: Any) -> str:
    if not isinstance(value, (list, tuple)):
        return f"{type(value).__name__} {value!r:.40}"
    try:
        return f"shape {np.asarray(value, dtype=object).shape}"
    except (TypeError, ValueError):  # ragged nesting
        return f"a ragged {type(value).__name__}"


def check_landmarks(kps: np.ndarray, image_shape: tuple[int, ...], where: str) -> None:
    """The shared landmark rules (``engines.check_landmarks``: the job applies the same ones),
    as a 422 naming the item."""
    try:
        engine_check_landmarks(kps, image_shape)
    except ValueError as exc:
        raise RequestError(422, "bad_landmarks", f"{where}: {exc}") from None


def to_crop(image: np.ndarray, landmarks: np.ndarray | None, where: str) -> np.ndarray:
    """Align on landmarks, or check that ``image`` already is a 112x112 crop."""
    if landmarks is not None:
        check_landmarks(landmarks, image.shape, where)
        try:
            return norm_crop(image, landmarks)
        except ValueError as exc:  # align's own contract: a ValueError names what was wrong
            raise RequestError(422, "bad_landmarks", f"{where}: {exc}") from None
    if image.shape[:2] != (FACE_SIZE, FACE_SIZE):
        h, w = image.shape[:2]
        raise RequestError(
            422,
            "not_aligned",
            f"{where}: image is {w}x{h}; aligned crops must be {FACE_SIZE}x{FACE_SIZE} "
            "(or send 5-point landmarks to align on the server)",
        )
    return image


def decode_json_body(body: bytes) -> Any:
    try:
        return json.loads(body)
    except RecursionError:
        raise RequestError(400, "bad_json", "body is not valid JSON: nested too deeply") from None
    except ValueError as exc:  # also JSONDecodeError, UnicodeDecodeError, int over 4300 digits
        raise RequestError(400, "bad_json", f"body is not valid JSON: {exc}") from None


UNSET = object()  # a field the request did not send (null is a value, and refused where one is needed)
_EMBED_FIELDS = ("images", "crops", "landmarks", "aligned")


def plan_embed_json(payload: Any, limits: Limits) -> list[FaceJob]:
    """``{"images": [b64...], "landmarks": [[[x, y] * 5] ...]?, "aligned": bool?}`` or
    ``{"crops": [b64 of 37632 raw BGR bytes...]}`` -> one job per face (headers read, budget
    checked, nothing decoded yet)."""
    if not isinstance(payload, dict):
        raise RequestError(422, "bad_request", "JSON body must be an object with an 'images' or 'crops' list")
    unknown = sorted(set(payload) - set(_EMBED_FIELDS))
    if unknown:
        raise RequestError(
            422, "bad_request", f"unknown field(s) {unknown}; expected {', '.join(_EMBED_FIELDS)}"
        )
    if "crops" in payload:
        return _plan_json_crops(payload, limits)
    images = payload.get("images")
    if not isinstance(images, list):
        raise RequestError(422, "bad_request", "'images' must be a list of base64 JPEG/PNG strings")
    return plan_images(images, payload.get("landmarks"), payload.get("aligned", UNSET), limits, decode_base64)


def plan_images(images: list, landmarks: Any, aligned: Any, limits: Limits,
                to_bytes=lambda data, where: data) -> list[FaceJob]:
    """The jobs of a list of encoded images, from a JSON body (``to_bytes``: base64 decode) or
    multipart file parts (bytes as they are): the same count, landmark and alignment rules,
    the same messages, whichever transport carried them."""
    check_face_count(len(images), limits)
    if aligned is UNSET:
        aligned = landmarks is None
    if not isinstance(aligned, bool):
        raise RequestError(422, "bad_request", "'aligned' must be true or false")
    if landmarks is not None:
        if aligned:
            raise RequestError(
                422, "bad_request", "'aligned': true and 'landmarks' contradict each other; send one"
            )
        if not isinstance(landmarks, list) or len(landmarks) != len(images):
            got = len(landmarks) if isinstance(landmarks, list) else type(landmarks).__name__
            raise RequestError(
                422,
                "bad_landmarks",
                f"'landmarks' must hold one entry per image ({len(images)}), got {got}",
            )
    elif not aligned:
        raise RequestError(
            422, "bad_request", "'aligned' is false but no 'landmarks' were sent to align with"
        )
    jobs = []
    for i, data in enumerate(images):
        where = f"images[{i}]"
        kps = parse_landmarks(landmarks[i], f"landmarks[{i}]") if landmarks is not None else None
        jobs.append(image_job(to_bytes(data, where), kps, where, limits))
    return check_request_pixels(jobs, limits)


def _plan_json_crops(payload: dict, limits: Limits) -> list[FaceJob]:
    if "images" in payload or "landmarks" in payload or "aligned" in payload:
        raise RequestError(422, "bad_request", "'crops' are aligned raw crops: send them without "
                                               "'images', 'landmarks' or 'aligned'")
    crops = payload["crops"]
    if not isinstance(crops, list):
        raise RequestError(422, "bad_request", "'crops' must be a list of base64 strings of "
                                               f"{RAW_CROP_BYTES} raw BGR bytes each")
    check_face_count(len(crops), limits)
    return [FaceJob(f"crops[{i}]", crop=raw_crop(decode_base64(text, f"crops[{i}]"), f"crops[{i}]"))
            for i, text in enumerate(crops)]


def decode_embed_json(payload: Any, limits: Limits) -> np.ndarray:
    """``plan_embed_json`` + ``run_jobs``: the crops of an ``/v1/embed`` JSON body."""
    return run_jobs(plan_embed_json(payload, limits))


def plan_face_spec(spec: Any, where: str, limits: Limits) -> tuple[FaceJob | None, np.ndarray | None]:
    """One side of ``/v1/compare``: ``{"image": b64, "landmarks"?}``, ``{"crop": b64}`` (a raw
    crop) or ``{"embedding": [...]}``. Returns ``(job, None)`` or ``(None, embedding)``."""
    kinds = ("image", "crop", "embedding")
    if not isinstance(spec, dict):
        raise RequestError(422, "bad_request",
                           f"{where}: expected an object with 'image', 'crop' or 'embedding'")
    given = [k for k in kinds if k in spec]
    if len(given) != 1:
        raise RequestError(422, "bad_request", f"{where}: give exactly one of 'image', 'crop' or 'embedding'")
    unknown = sorted(set(spec) - {*kinds, "landmarks"})
    if unknown or ("landmarks" in spec and given != ["image"]):
        raise RequestError(422, "bad_request",
                           f"{where}: unexpected field(s) {unknown or ['landmarks']}; "
                           "'landmarks' go with 'image'")
    if "embedding" in spec:
        try:
            vec = np.asarray(spec["embedding"], dtype=np.float64)
        except (TypeError, ValueError, OverflowError):
            raise RequestError(
                422, "bad_embedding", f"{where}: embedding must be a list of numbers"
            ) from None
        if vec.ndim != 1 or vec.size == 0:
            raise RequestError(
                422, "bad_embedding", f"{where}: embedding must be a flat list, got {vec.shape}"
            )
        if not np.isfinite(vec).all() or not np.linalg.norm(vec) > 0:
            raise RequestError(422, "bad_embedding", f"{where}: embedding must be finite and non-zero")
        return None, vec
    if "crop" in spec:
        return FaceJob(where, crop=raw_crop(decode_base64(spec["crop"], where), where)), None
    kps = parse_landmarks(spec["landmarks"], f"{where}.landmarks") if "landmarks" in spec else None
    return image_job(decode_base64(spec["image"], where), kps, where, limits), None


def decode_face_spec(spec: Any, where: str, limits: Limits) -> tuple[np.ndarray | None, np.ndarray | None]:
    """``plan_face_spec`` with the job run: ``(crop, None)`` or ``(None, embedding)``."""
    job, vec = plan_face_spec(spec, where, limits)
    return (job.run() if job is not None else None), vec


def plan_grpc_faces(faces: list, crops: bytes, limits: Limits) -> list[FaceJob] | np.ndarray:
    """``EmbedBatchRequest`` contents (one of ``faces`` or ``crops``) -> the crops tensor, or one
    job per ``Face`` (``image``: encoded, optional ``landmarks``; or ``crop``: raw bytes)."""
    if faces and crops:
        raise RequestError(400, "bad_request", "send either 'faces' or 'crops', not both")
    if crops:
        if len(crops) % RAW_CROP_BYTES:
            raise RequestError(
                422,
                "bad_shape",
                f"'crops' must be N x {RAW_CROP_BYTES} bytes ((N, 112, 112, 3) uint8), "
                f"got {len(crops)} bytes",
            )
        array = np.frombuffer(crops, np.uint8).reshape(-1, FACE_SIZE, FACE_SIZE, 3)
        check_face_count(array.shape[0], limits)
        return array.copy()
    check_face_count(len(faces), limits)
    jobs = []
    for i, face in enumerate(faces):
        where = f"faces[{i}]"
        if face.image and face.crop:
            raise RequestError(400, "bad_request", f"{where}: set one of 'image' (encoded) or 'crop' (raw)")
        if face.crop:
            if face.landmarks:
                raise RequestError(422, "bad_request", f"{where}: a raw 'crop' is aligned already; "
                                                       "landmarks go with 'image'")
            jobs.append(FaceJob(where, crop=raw_crop(face.crop, where)))
            continue
        kps = parse_landmarks(list(face.landmarks), f"{where}.landmarks") if face.landmarks else None
        jobs.append(image_job(face.image, kps, where, limits))
    return check_request_pixels(jobs, limits)


def check_grpc_encoding(encoding: int) -> None:
    """The answer encoding of an ``Embed``/``EmbedBatch`` request must be one this service writes.
    proto3 enums are open: a newer client's value arrives as a bare number, and answering it
    in another encoding than asked would be misread, so it is refused."""
    if encoding not in pb.Encoding.values():
        known = ", ".join(f"{name} ({value})" for name, value in pb.Encoding.items())
        raise RequestError(400, "bad_request", f"'encoding' must be one of {known}, got {encoding}")


def grpc_embed_response(embeddings: np.ndarray, norms: np.ndarray, fields: dict[str, Any],
                        encoding: int = pb.REPEATED) -> pb.EmbedResponse:
    """The ``EmbedResponse`` of ``(N, dim)`` embeddings and ``(N,)`` norms in the ``encoding`` asked
    for, and only that one: ``PACKED`` is one ``tobytes()`` of the matrix plus one packed float
    field (no message per face); ``REPEATED`` one ``Embedding`` per face, built from Python
    lists (iterating numpy rows into a repeated field costs about 6x more). ``fields``: dim,
    model, backend, contract, precision (the replica's ``_response_fields``)."""
    reply = pb.EmbedResponse(dim=fields["dim"], model=fields["model"], backend=fields["backend"],
                             contract=fields["contract"], precision=fields["precision"], encoding=encoding)
    if encoding == pb.PACKED:
        reply.embeddings_f32 = np.ascontiguousarray(embeddings, "<f4").tobytes()
        reply.norms.extend(np.asarray(norms, np.float32).tolist())
    else:
        reply.embeddings.extend(pb.Embedding(values=e, norm=n)
                                for e, n in zip(np.asarray(embeddings).tolist(), np.asarray(norms).tolist(),
                                                strict=True))
    return reply


def decode_grpc_faces(faces: list, crops: bytes, limits: Limits) -> np.ndarray:
    """``plan_grpc_faces`` with every job run: the crops of an ``EmbedBatchRequest``."""
    plan = plan_grpc_faces(faces, crops, limits)
    return plan if isinstance(plan, np.ndarray) else run_jobs(plan)
