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


@dataclass(frozen=True)
class ServeAppSettings:
    """Application arguments (``applications[].args`` in ``config/serve.yaml``)."""

    embedding_config: str | None = None  # default: $ARCFACE_CONFIG or config/embedding.yaml
    model: str | None = None
    backend: str | None = None
    max_faces_per_request: int = field(default=256, metadata={"min": 1})
    max_body_mb: float = field(default=16.0, metadata={"min": 0.001})
    max_image_megapixels: float = field(default=40.0, metadata={"min": 0.0126})  # >= one 112x112 crop
    max_pending_faces: int = field(default=4096, metadata={"min": 1})
    same_person_threshold: float = field(default=0.4, metadata={"min": -1.0, "max": 1.0})
    auth_token_env: str = "ARCFACE_SERVE_TOKEN"
    auth_token_file: str | None = None
    decode_threads: int = field(default=2, metadata={"min": 1})


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
        if settings.auth_token_file:
            path = Path(os.path.expanduser(settings.auth_token_file))
            try:
                token = path.read_text().strip()
            except OSError as exc:
                raise ConfigError(f"auth_token_file {path} cannot be read: {exc}") from exc
            if not token:
                raise ConfigError(f"auth_token_file {path} is empty")
            return cls(token)
        return cls(os.environ.get(settings.auth_token_env) or None)

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
