"""The HTTP API described as types: pydantic models of every JSON body and answer, and the
OpenAPI document built from them (``/openapi.json``, ``/docs``).

The models **document**; they do not validate. The routes take the raw request and the codec
checks it (its 4xx name the item and the rule; FastAPI's own validation would answer a generic
422 instead), so every route is declared here once, in ``ROUTES``: its request bodies by media
type, its answer by media type, the error statuses it can answer, whether it needs the bearer
token and whether it carries the timing headers. ``install_openapi`` merges that table into the
document FastAPI generates. A new route is one more ``RouteDoc`` entry plus its models.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.json_schema import models_json_schema

from .errors import REASONS
from .timing import TIMING_HEADERS

NPY_MEDIA_TYPE = "application/x-npy"  # also codec.NPY_MEDIA_TYPE (codec imports no pydantic)
JSON = "application/json"
MULTIPART = "multipart/form-data"
BINARY = {"type": "string", "format": "binary"}

Landmarks = list[list[float]] | list[float]
_LANDMARKS = ("5 [x, y] points in pixels of the image (left eye, right eye, nose, left and right "
              "mouth corner), or the same 10 numbers flat")


class _Doc(BaseModel):
    model_config = ConfigDict(extra="forbid")


# -- requests ----------------------------------------------------------------------------
class EmbedImagesRequest(_Doc):
    """Encoded images (JPEG, PNG, WebP, BMP, TIFF): aligned 112x112 crops, or any image with
    its 5-point landmarks to align on the server."""

    images: list[str] = Field(description="base64 (or data: URL) of each encoded image", min_length=1)
    landmarks: list[Landmarks] | None = Field(None, description=f"one entry per image: {_LANDMARKS}")
    aligned: bool | None = Field(None, description="true (the default without landmarks): the images "
                                                   "are 112x112 aligned crops; false needs landmarks")


class EmbedCropsRequest(_Doc):
    """Aligned raw crops: each exactly 112*112*3 = 37632 bytes of uint8 BGR, C order."""

    crops: list[str] = Field(description="base64 of each raw crop", min_length=1)


class EmbedMultipartRequest(_Doc):
    """``multipart/form-data``: one ``images`` file part per face (curl ``-F images=@a.jpg``)."""

    images: list[bytes] = Field(description="encoded image files, one part each")
    landmarks: str | None = Field(None, description="JSON text: one entry per file, in file order, "
                                                    f"each {_LANDMARKS}")
    aligned: bool | None = Field(None, description="as in the JSON body")


class FaceSpec(_Doc):
    """One side of a comparison: exactly one of ``image`` (with optional ``landmarks``),
    ``crop`` (a raw crop) or ``embedding`` (an embedding of this service's contract)."""

    image: str | None = Field(None, description="base64 of an encoded image")
    landmarks: Landmarks | None = Field(None, description=f"with 'image': {_LANDMARKS}")
    crop: str | None = Field(None, description="base64 of a 37632-byte raw BGR crop")
    embedding: list[float] | None = Field(None, description="an embedding (any norm, non-zero)")


class CompareRequest(_Doc):
    a: FaceSpec
    b: FaceSpec
    threshold: float | None = Field(None, ge=-1, le=1, description="same-person cosine threshold "
                                                                   "(default: same_person_threshold)")
    contract: str | None = Field(None, description="the contract the given embeddings were made in; "
                                                   "409 when it is not this service's")


class _IdentifyParams(_Doc):
    top_k: int | None = Field(None, ge=1, le=100, description="candidates per face (default identity.top_k)")
    threshold: float | None = Field(None, ge=-1, le=1, description="cosine at or above which the top "
                                                                   "candidate is a match (default "
                                                                   "identity.threshold)")


class IdentifyImagesRequest(EmbedImagesRequest, _IdentifyParams):
    """1:N: the faces of an embed body (encoded images) plus the search's parameters."""


class IdentifyCropsRequest(EmbedCropsRequest, _IdentifyParams):
    """1:N: the faces of an embed body (raw crops) plus the search's parameters."""


# -- answers -----------------------------------------------------------------------------
class _Served(BaseModel):
    """What serves the answer (also the ``x-arcface-*`` headers of a ``.npy`` answer)."""

    dim: int = Field(description="embedding dimension")
    model: str
    backend: str
    precision: str
    contract: str = Field(description="the embedding space: embeddings compare only within one contract")
    synthetic: bool = Field(description="true for synthetic test models (meaningless embeddings)")


class EmbedResponse(_Served):
    embeddings: list[list[float]] | str = Field(
        description="(N, dim) unit-norm embeddings, in request order (a string with encoding=base64)")
    norms: list[float] = Field(description="norm of each embedding before L2 normalisation (a quality cue)")
    encoding: Literal["json", "base64"] = Field(
        "json", description="how 'embeddings' is encoded (the request's ?encoding=): 'json' (lists of "
                            "numbers) or 'base64' (one string: C-order little-endian float32 (N, dim))")


class CompareResponse(_Served):
    cosine: float = Field(ge=-1, le=1)
    same_person: bool
    threshold: float


class Candidate(BaseModel):
    identity: str
    score: float = Field(ge=-1, le=1, description="cosine to the identity's template")


class Identification(BaseModel):
    identity: str = Field(description="the best identity at or above the threshold, else 'unknown'")
    match: bool
    score: float = Field(ge=-1, le=1, description="the top candidate's cosine")
    candidates: list[Candidate] = Field(description="the top-k identities, best first")


class IdentifyResponse(_Served):
    results: list[Identification] = Field(description="one per face, in request order")
    threshold: float
    gallery_version: int = Field(description="the gallery version this replica searched")
    gallery_identities: int


class ServiceInfo(BaseModel):
    model_config = ConfigDict(extra="allow")

    replica: str
    max_batch_size: int
    max_faces_per_request: int = Field(description="a client splits larger arrays into several requests")
    max_body_bytes: int
    max_image_pixels: int
    max_request_pixels: int
    auth: bool


class InfoResponse(BaseModel):
    """The engine's report (``arcface info``), the service's settings and batch statistics."""

    model_config = ConfigDict(extra="allow")

    backend: str
    model_id: str
    precision: str
    contract: str
    embedding_dim: int
    service: ServiceInfo
    batch_stats: dict[str, Any]


class HealthResponse(BaseModel):
    status: Literal["ok"]
    model: str | None = Field(None, description="with auth on, only to an authorized caller")
    backend: str | None = None
    contract: str | None = None
    dim: int | None = None
    precision: str | None = None
    synthetic: bool | None = None


class ErrorDetail(BaseModel):
    status: int = Field(description="the HTTP status again")
    reason: Literal[tuple(REASONS)] = Field(description="machine-readable tag (README error table)")  # type: ignore[valid-type]
    message: str = Field(description="what was wrong with which item")


class ErrorResponse(BaseModel):
    """Every refusal, from a replica or from Serve's proxy. 503s carry ``Retry-After``."""

    error: ErrorDetail


# -- the routes ----------------------------------------------------------------------------
@dataclass(frozen=True)
class RouteDoc:
    """One route: request bodies and 200 answers by media type (a model, or ``BINARY``)."""

    path: str
    method: str
    requests: dict[str, Any] = field(default_factory=dict)
    responses: dict[str, Any] = field(default_factory=dict)
    errors: tuple[int, ...] = (500, 503)
    auth: bool = True
    timing: bool = False
    query: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> OpenAPI parameter fields


_FACE_ERRORS = (400, 401, 413, 415, 422, 500, 503)
_ENCODING_PARAM = {
    "description": "how a JSON answer carries the embeddings: json (lists of numbers) or base64 "
                   "(their C-order little-endian float32 bytes: 0.43x the size)",
    "schema": {"type": "string", "enum": ["json", "base64"], "default": "json"},
}
ROUTES: list[RouteDoc] = [
    RouteDoc("/v1/embed", "post",
             requests={JSON: EmbedImagesRequest | EmbedCropsRequest, NPY_MEDIA_TYPE: BINARY,
                       MULTIPART: EmbedMultipartRequest},
             responses={JSON: EmbedResponse, NPY_MEDIA_TYPE: BINARY}, errors=(*_FACE_ERRORS[:2], 403,
                                                                              *_FACE_ERRORS[2:]), timing=True,
             query={"encoding": _ENCODING_PARAM}),
    RouteDoc("/v1/compare", "post", requests={JSON: CompareRequest}, responses={JSON: CompareResponse},
             errors=(*_FACE_ERRORS[:2], 409, *_FACE_ERRORS[2:]), timing=True),
    RouteDoc("/v1/identify", "post", requests={JSON: IdentifyImagesRequest | IdentifyCropsRequest},
             responses={JSON: IdentifyResponse}, errors=(*_FACE_ERRORS[:2], 409, *_FACE_ERRORS[2:]),
             timing=True),
    RouteDoc("/v1/info", "get", responses={JSON: InfoResponse}, errors=(401, 500, 503)),
    RouteDoc("/healthz", "get", responses={JSON: HealthResponse}, auth=False),
]
_NPY_DOC = {
    "request": "np.save of (N, 112, 112, 3) uint8 BGR aligned crops",
    "response": "np.save of (N, dim) float32 unit-norm embeddings (send Accept: application/x-npy); "
                "what serves them in x-arcface-dim/model/backend/precision/contract/synthetic headers, "
                "the norms before L2 in x-arcface-norms (base64 of little-endian float32)",
}


def _models() -> list[type[BaseModel]]:
    found: list[type[BaseModel]] = [ErrorResponse]
    for route in ROUTES:
        for spec in (*route.requests.values(), *route.responses.values()):
            for model in getattr(spec, "__args__", (spec,)):
                if isinstance(model, type) and issubclass(model, BaseModel) and model not in found:
                    found.append(model)
    return found


def _ref(spec: Any) -> dict[str, Any]:
    if spec is BINARY:
        return dict(BINARY)
    models = getattr(spec, "__args__", None)
    if models:
        return {"oneOf": [_ref(m) for m in models]}
    return {"$ref": f"#/components/schemas/{spec.__name__}"}


def _content(specs: dict[str, Any], kind: str) -> dict[str, Any]:
    out = {}
    for media, spec in specs.items():
        entry: dict[str, Any] = {"schema": _ref(spec)}
        if media == NPY_MEDIA_TYPE:
            entry["schema"]["description"] = _NPY_DOC[kind]
        if media == MULTIPART:
            entry["encoding"] = {"images": {"contentType": "image/*"}}
        out[media] = entry
    return out


def _timing_headers() -> dict[str, Any]:
    return {name: {"description": text,
                   "schema": {"type": "integer" if name == "x-batch-faces" else "number"}}
            for name, text in TIMING_HEADERS.items()}


def build_openapi(base: dict[str, Any]) -> dict[str, Any]:
    """``base`` (FastAPI's generated document) with the bodies, answers, errors and auth of
    ``ROUTES``. Raises ``KeyError`` for a route of the table the app does not serve."""
    spec = dict(base)
    components = spec.setdefault("components", {})
    _, defs = models_json_schema([(m, "serialization") for m in _models()],
                                 ref_template="#/components/schemas/{model}")
    schemas = components.setdefault("schemas", {})
    schemas.update(defs.get("$defs", {}))
    components["securitySchemes"] = {
        "bearerAuth": {"type": "http", "scheme": "bearer",
                       "description": "Authorization: Bearer <token>, when the service has one"}}
    error = {"description": "refused", "content": {JSON: {"schema": _ref(ErrorResponse)}}}
    retry = {"Retry-After": {"description": "seconds to wait before retrying", "schema": {"type": "integer"}}}
    for route in ROUTES:
        op = spec["paths"][route.path][route.method]
        if route.requests:
            op["requestBody"] = {"required": True, "content": _content(route.requests, "request")}
        ok: dict[str, Any] = {"description": "success", "content": _content(route.responses, "response")}
        if route.timing:
            ok["headers"] = _timing_headers()
        op["responses"] = {"200": ok}
        if route.query:
            op["parameters"] = [{"name": name, "in": "query", "required": False, **param}
                                for name, param in route.query.items()]
        for status in route.errors:
            answer = {**error, "description": _STATUS_TEXT[status]}
            if status == 503:
                answer["headers"] = retry
            op["responses"][str(status)] = answer
        if route.auth:
            op["security"] = [{"bearerAuth": []}, {}]  # {}: auth is off unless a token is set
    return spec


_STATUS_TEXT = {
    400: "malformed body (JSON, base64, npy, multipart)", 401: "missing or wrong bearer token",
    403: "a multipart upload from a web page of another origin (a cross-site form)",
    409: "contract mismatch", 413: "too large (body, faces, image or decode budget)",
    415: "unsupported media type or image format", 422: "well-formed but unusable input",
    500: "internal error (an id to find in the replica log)",
    503: "overloaded or unavailable: retry after Retry-After seconds",
}


def install_openapi(app) -> None:
    """Serve ``build_openapi`` of the app's generated document at ``/openapi.json`` (cached)."""
    from fastapi.openapi.utils import get_openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = build_openapi(get_openapi(
                title=app.title, version=app.version, description=app.description, routes=app.routes))
        return app.openapi_schema

    app.openapi = openapi
