"""1:N identify in the service: the replica's gallery, and the request fields identify adds.

Each replica loads the gallery (``gallery`` app arg, else ``identity.gallery`` of the embedding
config) when it starts, under the engine's contract: a gallery of another contract stops
the replica from starting, naming both. A new gallery version is picked up without a restart
by changing ``gallery_reload`` in the deployment's ``user_config`` (any new value: Serve
calls ``reconfigure`` on every replica, which reloads the latest version); a failed reload
keeps the gallery in memory and logs why. The faces of an identify request go through the
same face-counted batch queue as ``/v1/embed``; the search itself is a matrix product on
the replica (``engines.search``).
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from engines import ConfigError, Gallery, VectorStore, load_gallery

from .codec import is_number
from .errors import RequestError

logger = logging.getLogger(__name__)

IDENTIFY_FIELDS = ("top_k", "threshold")
MAX_TOP_K = 100


class GalleryHolder:
    """The gallery a replica searches, swapped whole on reload (readers never see a half)."""

    def __init__(self, uri: str | None, contract: str, dim: int, storage, reload_token: Any = 0) -> None:
        self.uri, self.contract, self.dim = uri, contract, dim
        self._storage = storage
        self._lock = threading.Lock()
        self.gallery: Gallery | None = None
        self.reload_token = reload_token  # the user_config value the loaded gallery answers to
        if uri:
            self.gallery = self._load()

    def _load(self) -> Gallery:
        store = VectorStore(self.uri, self.contract, self._storage.endpoint_url, self._storage.region)
        stamp = store.read_stamp()
        if stamp is None:
            raise ConfigError(f"gallery {self.uri} does not exist (enroll into it: arcface gallery enroll)")
        store.open(stamp.get("model_id", "?"), self.dim)  # another contract: refused, naming both
        gallery = load_gallery(store, self.dim)
        logger.info("gallery %s version %d: %d identities", self.uri, gallery.version, len(gallery))
        return gallery

    def reconfigure(self, token: Any) -> None:
        """Reload when ``user_config.gallery_reload`` changed since the last call."""
        if token == self.reload_token:
            return
        self.reload_token = token
        if not self.uri:
            return
        try:
            gallery = self._load()
        except Exception:  # keep serving the gallery in memory; the log says why
            logger.exception("gallery reload from %s failed; still serving version %s", self.uri,
                             self.gallery.version if self.gallery else None)
            return
        with self._lock:
            self.gallery = gallery

    def current(self) -> Gallery:
        with self._lock:
            gallery = self.gallery
        if gallery is None:
            raise RequestError(409, "no_gallery", "this service has no gallery: set the app arg 'gallery' "
                                                  "or identity.gallery in its embedding config")
        return gallery


def identify_params(payload: dict[str, Any], default_top_k: int,
                    default_threshold: float) -> tuple[int, float]:
    """``top_k`` (1..100) and ``threshold`` (cosine in [-1, 1]) of a request, else the config's."""
    top_k = payload.get("top_k", default_top_k)
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= MAX_TOP_K:
        raise RequestError(422, "bad_request", f"'top_k' must be an integer in [1, {MAX_TOP_K}], "
                                               f"got {top_k!r:.40}")
    threshold = payload.get("threshold", default_threshold)
    if not (is_number(threshold) and -1 <= threshold <= 1):
        raise RequestError(422, "bad_request",
                           f"'threshold' must be a number in [-1, 1], got {threshold!r:.40}")
    return top_k, float(threshold)


def split_identify_payload(payload: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """(identify's own fields, the rest: an embed request's body)."""
    if not isinstance(payload, dict):
        raise RequestError(422, "bad_request", "JSON body must be an object with an 'images' or 'crops' list")
    own = {k: payload[k] for k in IDENTIFY_FIELDS if k in payload}
    return own, {k: v for k, v in payload.items() if k not in IDENTIFY_FIELDS}
