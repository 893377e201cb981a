"""How the replica writes its answers: JSON through orjson, and the embeddings of ``/v1/embed``
in the encoding the caller asked for.

JSON answers are built on the replica's event loop, so their cost is paid by every request
queued behind it. The stdlib path (``ndarray.tolist()`` then ``json.dumps``) builds a Python
float per value; orjson serialises the array itself, printing each float32 in its shortest
form (which reads back to the same float32), more than an order of magnitude faster; and
``encoding=base64`` puts the float32 bytes themselves in the JSON, cheaper again and under half
the bytes. ``arcface bench-answers`` measures the encodings side by side (README "Answer
encodings").

``/v1/embed`` answers (README "HTTP API"):

- ``encoding=json`` (query parameter, the default): ``"embeddings"`` is an ``(N, dim)`` list of
  lists of numbers;
- ``encoding=base64``: ``"embeddings"`` is the base64 of the C-order little-endian float32
  ``(N, dim)`` matrix (``np.frombuffer(base64.b64decode(s), "<f4").reshape(-1, dim)``);
- ``Accept: application/x-npy``: the body is the ``.npy`` of that matrix; the norms travel in
  the ``x-arcface-norms`` header, base64 of their little-endian float32 (N x 4 bytes: at most
  1.4 KB at the default 256 faces per request).
"""

from __future__ import annotations

import base64
from typing import Any

import numpy as np
import orjson
from fastapi.responses import Response

from .codec import NPY_MEDIA_TYPE, encode_npy
from .errors import RequestError

JSON_MEDIA_TYPE = "application/json"
ENCODINGS = ("json", "base64")
_OPTIONS = orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_NON_STR_KEYS


def json_bytes(payload: Any) -> bytes:
    """``payload`` as JSON; numpy arrays and scalars as numbers, without ``tolist()``."""
    return orjson.dumps(payload, option=_OPTIONS, default=_fallback)


def _fallback(value: Any) -> Any:
    if isinstance(value, np.generic):  # e.g. float16, which orjson does not serialise
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def json_response(payload: Any, headers: dict[str, str] | None = None, status_code: int = 200) -> Response:
    return Response(json_bytes(payload), status_code=status_code, media_type=JSON_MEDIA_TYPE,
                    headers=headers)


def requested_encoding(query: dict[str, str] | Any) -> str:
    """The ``encoding`` query parameter of ``/v1/embed`` (``json`` when absent); another value is
    a 422 naming the ones there are (before any face is decoded)."""
    encoding = query.get("encoding", "json")
    if encoding not in ENCODINGS:
        raise RequestError(422, "bad_request", f"unknown encoding {encoding[:40]!r}; expected one of "
                                               f"{', '.join(ENCODINGS)} (or Accept: {NPY_MEDIA_TYPE})")
    return encoding


def float32_base64(array: np.ndarray) -> str:
    """Base64 of ``array``'s C-order little-endian float32 bytes."""
    return base64.b64encode(np.ascontiguousarray(array, "<f4").tobytes()).decode("ascii")


def embed_answer(embeddings: np.ndarray, norms: np.ndarray, fields: dict[str, Any],
                 headers: dict[str, str], accept: str, encoding: str) -> Response:
    """The answer of ``/v1/embed`` (see the module docstring); ``fields``: model, backend,
    contract and the other served metadata; ``headers``: the timing headers."""
    if NPY_MEDIA_TYPE in accept:
        meta = {f"x-arcface-{k}": str(v) for k, v in fields.items()}
        return Response(encode_npy(embeddings), media_type=NPY_MEDIA_TYPE,
                        headers={**meta, "x-arcface-norms": float32_base64(norms), **headers})
    values: Any = float32_base64(embeddings) if encoding == "base64" else embeddings
    return json_response({"embeddings": values, "norms": norms, "encoding": encoding, **fields}, headers)
