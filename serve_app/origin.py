"""Cross-site uploads: a multipart body from a web page of another origin is refused.

``multipart/form-data`` is the one body type the service takes that an HTML form on any site can
post without a CORS preflight (JSON and ``.npy`` need one, which the service never grants; no
Content-Type, ``text/plain`` and form-urlencoded are refused by the route). Without this check
a page on another site could make its visitors' browsers spend this service's compute when
auth is off (a form cannot carry the bearer token, so with ``require_auth`` on it gets 401).
A browser names the page's origin in the ``Origin`` header of such a POST (``null`` for an
opaque one: a sandboxed frame, a ``file:`` page); clients that are not browsers (curl ``-F``,
``serve_app.client``) send none and are not affected. The service's own origin is the
request's ``Host`` (or ``X-Forwarded-Host``, behind a proxy that rewrites ``Host``).
"""

from __future__ import annotations

from collections.abc import Mapping
from urllib.parse import urlsplit

from .errors import RequestError


def check_same_origin(headers: Mapping[str, str]) -> None:
    """Raise 403 ``cross_origin`` when ``headers`` carry an ``Origin`` whose host and port are
    not this service's."""
    origin = headers.get("origin")
    if origin is None:
        return
    try:
        origin_host = urlsplit(origin.strip()).netloc.lower()
    except ValueError:  # a malformed Origin (e.g. an unclosed IPv6 bracket) is nobody's
        origin_host = ""
    ours = {h.strip().lower() for h in (headers.get("host"), headers.get("x-forwarded-host")) if h}
    if origin_host and origin_host in ours:
        return
    raise RequestError(403, "cross_origin",
                       f"a multipart upload from the web page of origin {origin!r:.100}, which is not this "
                       "service's: a cross-site form may not spend this service's compute; upload from a "
                       "page the service itself serves, or from a client that is not a browser")
