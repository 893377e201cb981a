"""Typed settings of the Serve application (the ``args`` of its deploy config).

Engine choices (model, backend chain, precision, batch limits) stay in
``config/embedding.yaml``; these are the service's own: limits, auth, the
live-tunable batching knobs' starting values.
"""

from __future__ import annotations

import hmac
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engines import ConfigError, build_typed


@dataclass(frozen=True)
class BatchingConfig:
    """``user_config`` of the deployment: changed live with ``reconfigure``."""

    max_batch_size: int | None = field(default=None, metadata={"min": 1})  # None: engine opt batch
    batch_wait_timeout_s: float = field(default=0.02, metadata={"min": 0.0, "max": 10.0})
    # Any new value reloads the gallery (its latest version) on every replica, without a restart.
    gallery_reload: int = field(default=0, metadata={"min": 0})


@dataclass(frozen=True)
class ServeAppSettings:
    """Application arguments (``applications[].args`` in ``config/serve.yaml``)."""

    embedding_config: str | None = None  # default: $ARCFACE_CONFIG or config/embedding.yaml
    model: str | None = None
    backend: str | None = None
    max_faces_per_request: int = field(default=256, metadata={"min": 1})
    max_body_mb: float = field(default=16.0, metadata={"min": 0.001})
    max_image_megapixels: float = field(default=40.0, metadata={"min": 0.0126})  # >= one 112x112 crop
    # declared pixels of all images of one request, summed: the request's decode work
    max_request_megapixels: float = field(default=100.0, metadata={"min": 0.0126})
    max_pending_faces: int = field(default=4096, metadata={"min": 1})
    # longest wait for the engine (and for a decode thread) before a request gets 503
    max_queue_wait_s: float = field(default=0.25, metadata={"min": 0.001, "max": 60.0})
    retry_after_s: int = field(default=1, metadata={"min": 1, "max": 3600})  # Retry-After of 503s
    same_person_threshold: float = field(default=0.4, metadata={"min": -1.0, "max": 1.0})
    require_auth: bool = False  # refuse to start without a token
    auth_token_env: str = "ARCFACE_SERVE_TOKEN"
    auth_token_file: str | None = None
    decode_threads: int = field(default=2, metadata={"min": 1})
    gallery: str | None = None  # the gallery /v1/identify searches; default identity.gallery
    # names browsers may reach the service by (host or host:port), besides IP addresses and
    # localhost: a browser's request under any other name is refused (DNS rebinding)
    allowed_hosts: tuple[str, ...] = ()


def parse_settings(args: dict[str, Any] | None) -> ServeAppSettings:
    return build_typed(ServeAppSettings, dict(args or {}), "serve app args")


def parse_user_config(user_config: dict[str, Any] | None) -> BatchingConfig:
    return build_typed(BatchingConfig, dict(user_config or {}), "user_config")


class TokenAuth:
    """Optional bearer-token check; the token comes from an env var or a file."""

    def __init__(self, token: str | None) -> None:
        self._token = token.encode() if token else None

    @classmethod
    def from_settings(cls, settings: ServeAppSettings) -> TokenAuth:
        """The token of ``auth_token_file`` or ``$<auth_token_env>``; with ``require_auth``,
        no token is a ``ConfigError`` (the replica does not start) instead of auth off."""
        if settings.auth_token_file:
            path = Path(os.path.expanduser(settings.auth_token_file))
            try:
                token = path.read_text().strip()
            except OSError as exc:
                raise ConfigError(f"auth_token_file {path} cannot be read: {exc}") from exc
            if not token:
                raise ConfigError(f"auth_token_file {path} is empty")
            return cls(token)
        auth = cls(os.environ.get(settings.auth_token_env, "").strip() or None)
        if settings.require_auth and not auth.enabled:
            raise ConfigError(
                f"require_auth is true but there is no token: ${settings.auth_token_env} is unset or "
                "empty in this replica's environment and auth_token_file is not set; set one of them "
                "(the service refuses to start without auth rather than serve everyone)"
            )
        return auth

    @property
    def enabled(self) -> bool:
        return self._token is not None

    def check(self, authorization: str | None) -> bool:
        """Constant-time comparison of ``Authorization: Bearer <token>``."""
        if self._token is None:
            return True
        scheme, _, supplied = (authorization or "").partition(" ")
        if scheme.lower() != "bearer":
            return False
        return hmac.compare_digest(supplied.strip().encode(), self._token)
