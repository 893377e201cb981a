"""Requests a web page makes: from another site, or from a rebound DNS name, they are refused.

A browser names the page's origin in the ``Origin`` header of every POST (``null`` for an
opaque one: a sandboxed frame, a ``file:`` page); clients that are not browsers (curl,
``serve_app.client``) send none and are not affected. Two attacks are closed here:

- **A cross-site form.** ``multipart/form-data`` is the one body type the service takes that
  an HTML form on any site can post without a CORS preflight (JSON and ``.npy`` need one, which
  the service never grants). Without this check a page on another site could make its visitors'
  browsers spend this service's compute when auth is off (a form cannot carry the bearer token).
  The page's origin must be the service's own: same scheme, host and port.
- **DNS rebinding.** A page on ``rebind.evil.example`` re-resolves its own name to 127.0.0.1 and
  is then same-origin with a service on loopback: the browser sends ``Host`` and ``Origin`` of
  the attacker's name, which agree. So an ``Origin``'s host must also be one the service knows:
  an IP address, ``localhost``, or a name in the ``allowed_hosts`` setting (the names a
  deployment's pages are served under, e.g. ``faces.example``).

The service's own origin is the request's ``Host`` (or ``X-Forwarded-Host``) and scheme
(``X-Forwarded-Proto``, else http: the service itself serves plain HTTP).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from urllib.parse import urlsplit

from .errors import RequestError


def check_same_origin(headers: Mapping[str, str], allowed_hosts: Iterable[str] = ()) -> None:
    """Raise 403 ``cross_origin`` when ``headers`` carry an ``Origin`` that is not this service's
    (scheme, host and port), or whose host the service does not know (``allowed_hosts``)."""
    origin = headers.get("origin")
    if origin is None:
        return
    try:
        parts = urlsplit(origin.strip())
        origin_scheme, origin_host = parts.scheme.lower(), parts.netloc.lower()
    except ValueError:  # a malformed Origin (e.g. an unclosed IPv6 bracket) is nobody's
        origin_scheme, origin_host = "", ""
    ours = {h.strip().lower() for h in (headers.get("host"), headers.get("x-forwarded-host")) if h}
    scheme = (headers.get("x-forwarded-proto") or "http").split(",")[0].strip().lower()
    if origin_host and origin_host in ours and origin_scheme == scheme:
        if known_host(origin_host, allowed_hosts):
            return
        raise RequestError(403, "cross_origin",
                           f"a request from the web page of origin {origin!r:.100}: the service does not "
                           "know that name (a page on it may be a DNS-rebinding attack); a deployment "
                           "served under a name lists it in the app's allowed_hosts")
    raise RequestError(403, "cross_origin",
                       f"a request from the web page of origin {origin!r:.100}, which is not this "
                       "service's: a cross-site page may not spend this service's compute; send it "
                       "from a page the service itself serves, or from a client that is not a browser")


def known_host(netloc: str, allowed_hosts: Iterable[str] = ()) -> bool:
    """``netloc`` (``host[:port]``) names this service for certain: an IP address, ``localhost``,
    or a name (with or without its port) in ``allowed_hosts``."""
    allowed = {name.strip().lower() for name in allowed_hosts}
    if netloc in allowed:
        return True
    host = netloc.rsplit(":", 1)[0] if not netloc.endswith("]") else netloc
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if host in allowed or host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True
