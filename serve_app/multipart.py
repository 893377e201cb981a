"""``multipart/form-data`` bodies of ``POST /v1/embed`` (browsers, ``curl -F``, most face APIs).

Parts: one ``images`` file part per face (encoded JPEG/PNG/WebP/BMP/TIFF, in face order), an
optional ``landmarks`` text part (JSON: one entry per file, as in the JSON body) and an optional
``aligned`` part (``true``/``false``). The body arrives already bounded by ``max_body_mb``; the
parts then go through ``codec.plan_images``, the JSON body's own rules, limits and messages.
"""

from __future__ import annotations

import json
from typing import Any

from .codec import UNSET, FaceJob, Limits, plan_images
from .errors import RequestError

FIELDS = ("images", "landmarks", "aligned")


async def plan_multipart(body: bytes, content_type: str, limits: Limits) -> list[FaceJob]:
    """The jobs of a multipart body (headers read, budget checked, nothing decoded yet)."""
    from starlette.datastructures import Headers, UploadFile
    from starlette.formparsers import MultiPartException, MultiPartParser

    async def stream():
        yield body

    parser = MultiPartParser(Headers({"content-type": content_type}), stream(),
                             max_files=limits.max_faces + 1, max_fields=len(FIELDS) + 1)
    try:
        form = await parser.parse()
    except MultiPartException as exc:
        if "Too many files" in exc.message:
            raise RequestError(413, "too_many_faces", f"more than {limits.max_faces} files in one request, "
                                                      "the limit; split the request") from None
        raise RequestError(400, "bad_multipart", f"body is not valid multipart/form-data: {exc.message}") \
            from None
    try:
        unknown = sorted(set(form.keys()) - set(FIELDS))
        if unknown:
            raise RequestError(422, "bad_request",
                               f"unknown part(s) {unknown}; expected {', '.join(FIELDS)}")
        images = []
        for i, part in enumerate(form.getlist("images")):
            if not isinstance(part, UploadFile):
                raise RequestError(422, "bad_request", f"images[{i}]: each 'images' part must be a file "
                                                       "(curl -F images=@face.jpg), not a text field")
            images.append(await part.read())
        return plan_images(images, _landmarks(form), _aligned(form), limits)
    finally:
        await form.close()


def _one(form, name: str) -> Any:
    values = form.getlist(name)
    if len(values) > 1:
        raise RequestError(422, "bad_request", f"'{name}' given {len(values)} times; send it once")
    if values and not isinstance(values[0], str):
        raise RequestError(422, "bad_request", f"'{name}' must be a text part, not a file")
    return values[0] if values else UNSET


def _landmarks(form) -> Any:
    text = _one(form, "landmarks")
    if text is UNSET:
        return None
    try:
        return json.loads(text)
    except RecursionError:  # the same answer a JSON body nested this deep gets, a 4xx, not a 500
        raise RequestError(422, "bad_landmarks",
                           "'landmarks' part is not valid JSON: nested too deeply") from None
    except ValueError as exc:
        raise RequestError(422, "bad_landmarks", f"'landmarks' part is not valid JSON: {exc}") from None


def _aligned(form) -> Any:
    text = _one(form, "aligned")
    if text is UNSET:
        return UNSET
    value = {"true": True, "false": False}.get(text.strip().lower())
    if value is None:
        raise RequestError(422, "bad_request", f"'aligned' must be true or false, got {text!r:.40}")
    return value
