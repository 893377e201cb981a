"""Resolve a model reference to a local ONNX file and its sha256.

References, in the order they are recognised:

- ``synthetic:<arch>[@<seed>]``: ``iresnet50``, ``iresnet100``, ``mobilefacenet`` (and
  ``probe``, the zero-cost graph that measures the shells alone);
  generated locally (see ``synthetic.py``), cached under ``<cache>/models/synthetic``;
- ``s3://bucket/key.onnx``: downloaded once into ``<cache>/models/s3/``;
- an insightface pack name (``buffalo_l``, ``antelopev2``, ...): the recognition
  model of that pack under ``$INSIGHTFACE_HOME`` or ``~/.insightface/models/``;
- anything else: a local file path.

The sha256 is of the file actually loaded; the embedding contract uses
``contract_sha256``, which for a precision-converted graph is the sha256 of
the fp32 graph it was derived from (same weights, same vector space).
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path

from ..base.preprocess import NCHW_FLOAT, Normalization
from ..errors import ModelResolutionError
from ..s3 import download_verified, make_client, parse_s3_uri, sha256_file
from .graph import graph_facts

logger = logging.getLogger(__name__)

SYNTHETIC_PREFIX = "synthetic:"
INPUT_LAYOUT_KEY = "arcface_ray.input_layout"  # metadata key of a graph whose input is not NCHW float
DEFAULT_CACHE_DIR = "~/.cache/arcface"

# Recognition model of each insightface pack, with the sha256 prefix the
# official InsightFace server pins for it (shared/research/anchors.md §4.1).
INSIGHTFACE_PACKS: dict[str, tuple[str, str | None]] = {
    "buffalo_l": ("w600k_r50.onnx", "4c06341c"),
    "buffalo_m": ("w600k_r50.onnx", "4c06341c"),
    "buffalo_s": ("w600k_mbf.onnx", "9cc6e4a7"),
    "buffalo_sc": ("w600k_mbf.onnx", "9cc6e4a7"),
    "antelopev2": ("glintr100.onnx", "4ab1d643"),
}


@dataclass(frozen=True)
class ResolvedModel:
    """A model reference made concrete: a local ONNX file plus what we know of it."""

    ref: str
    model_id: str
    path: str
    sha256: str
    source: str  # synthetic | s3 | insightface | local
    synthetic: bool = False
    arch: str | None = None
    precision: str = "fp32"
    derived_from_sha256: str | None = None
    normalization: Normalization = field(default_factory=Normalization)
    macs_per_face: int | None = None
    embedding_dim: int | None = None  # from the graph's output shape, when static
    # what the graph's input is: normalised float32 NCHW (the default), or the raw uint8 BGR
    # NHWC crops with the preprocessing as graph nodes (``preprocess_graph.NHWC_UINT8``)
    input_layout: str = NCHW_FLOAT

    @property
    def probe(self) -> bool:
        """The zero-cost probe graph (``synthetic:probe``): never a face model."""
        return self.synthetic and self.arch == "probe"

    @property
    def contract_sha256(self) -> str:
        return self.derived_from_sha256 or self.sha256

    def derived(self, path: Path, sha256: str, precision: str,
                input_layout: str | None = None) -> ResolvedModel:
        """The same model re-expressed: in another precision (``precision.py``) or with its
        preprocessing in the graph (``preprocess_graph.py``); same weights, same contract."""
        return replace(
            self,
            path=str(path),
            sha256=sha256,
            precision=precision,
            derived_from_sha256=self.contract_sha256,
            input_layout=input_layout or self.input_layout,
        )

    def to_dict(self) -> dict:
        return {
            "ref": self.ref,
            "model_id": self.model_id,
            "path": self.path,
            "sha256": self.sha256,
            "source": self.source,
            "synthetic": self.synthetic,
            "arch": self.arch,
            "precision": self.precision,
            "derived_from_sha256": self.derived_from_sha256,
            "normalization": self.normalization.tag,
            "macs_per_face": self.macs_per_face,
            "embedding_dim": self.embedding_dim,
            "gmacs_per_face": None if self.macs_per_face is None else self.macs_per_face / 1e9,
            "probe": self.probe,
            "input_layout": self.input_layout,
        }


def cache_root(cache_dir: str | None = None) -> Path:
    return Path(os.path.expanduser(cache_dir or os.environ.get("ARCFACE_CACHE_DIR") or DEFAULT_CACHE_DIR))


_locks: dict[str, threading.Lock] = {}
_locks_guard = threading.Lock()


def _thread_lock(key: str) -> threading.Lock:
    with _locks_guard:
        return _locks.setdefault(key, threading.Lock())


@lru_cache(maxsize=64)
def _sha256_cached(path: str, size: int, mtime_ns: int) -> str:
    return sha256_file(path)


def file_sha256(path: str | Path) -> str:
    """sha256 of a file, memoised on (path, size, mtime) for this process."""
    st = os.stat(path)
    return _sha256_cached(str(path), st.st_size, st.st_mtime_ns)


def _with_graph_facts(model: ResolvedModel) -> ResolvedModel:
    facts = graph_facts(model.path, model.sha256)
    props = facts.props
    synthetic = model.synthetic or props.get("arcface_ray.synthetic") == "true"
    return replace(
        model,
        normalization=facts.normalization,
        macs_per_face=facts.macs_per_face,
        embedding_dim=facts.embedding_dim,
        synthetic=synthetic,
        arch=model.arch or props.get("arcface_ray.arch"),
        precision=props.get("arcface_ray.precision", model.precision),
        derived_from_sha256=model.derived_from_sha256 or props.get("arcface_ray.derived_from_sha256"),
        input_layout=props.get(INPUT_LAYOUT_KEY, model.input_layout),
    )


def build_once(dest: Path, build, what: str) -> None:
    """Make ``dest`` exactly once per host: ``build(tmp_path)`` writes a temporary file under
    a file lock (and a thread lock), which is renamed into place; concurrent callers wait and
    then find it. Generated models, converted graphs and in-graph preprocessing all use it."""
    if dest.exists():
        return
    from filelock import FileLock

    dest.parent.mkdir(parents=True, exist_ok=True)
    with _thread_lock(str(dest)), FileLock(str(dest) + ".lock"):
        if dest.exists():
            return
        tmp = dest.with_name(f".{dest.stem}.{os.getpid()}.{threading.get_ident()}.tmp.onnx")
        logger.info("%s -> %s", what, dest)
        try:
            build(tmp)
            os.replace(tmp, dest)
        finally:
            tmp.unlink(missing_ok=True)


def _resolve_synthetic(ref: str, cache: Path) -> ResolvedModel:
    from . import synthetic

    spec = ref[len(SYNTHETIC_PREFIX) :]
    arch, _, seed_text = spec.partition("@")
    if arch not in synthetic.ARCHITECTURES:
        raise ModelResolutionError(
            f"unknown synthetic architecture {arch!r} in {ref!r}; choose one of "
            f"{sorted(synthetic.ARCHITECTURES)}"
        )
    try:
        seed = int(seed_text) if seed_text else synthetic.DEFAULT_SEED
    except ValueError:
        raise ModelResolutionError(f"synthetic seed must be an integer in {ref!r}") from None
    path = cache / "models" / "synthetic" / f"{arch}-s{seed}-g{synthetic.GENERATOR_VERSION}.onnx"
    build_once(path, lambda tmp: synthetic.write_synthetic_model(arch, tmp, seed),
               f"generating synthetic {arch} (seed {seed})")
    model_id = f"synthetic-{arch}" + (f"-s{seed}" if seed != synthetic.DEFAULT_SEED else "")
    return ResolvedModel(
        ref=ref,
        model_id=model_id,
        path=str(path),
        sha256=file_sha256(path),
        source="synthetic",
        synthetic=True,
        arch=arch,
    )


def _resolve_s3(ref: str, cache: Path, endpoint_url: str | None, region: str | None) -> ResolvedModel:
    try:
        uri = parse_s3_uri(ref)
    except ValueError as exc:
        raise ModelResolutionError(str(exc)) from None
    dest = cache / "models" / "s3" / uri.bucket / uri.key
    if not dest.exists():
        from filelock import FileLock

        dest.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(dest) + ".lock"):
            if not dest.exists():
                logger.info("downloading model %s -> %s", uri, dest)
                try:
                    download_verified(make_client(endpoint_url, region), uri, dest)
                except Exception as exc:
                    raise ModelResolutionError(f"cannot fetch model {ref}: {exc}") from exc
    return ResolvedModel(
        ref=ref, model_id=Path(uri.key).stem, path=str(dest), sha256=file_sha256(dest), source="s3"
    )


def insightface_home() -> Path:
    return Path(os.path.expanduser(os.environ.get("INSIGHTFACE_HOME", "~/.insightface")))


def _resolve_pack(ref: str) -> ResolvedModel:
    filename, published = INSIGHTFACE_PACKS[ref]
    path = insightface_home() / "models" / ref / filename
    if not path.exists():
        raise ModelResolutionError(
            f"insightface pack {ref!r} expects its recognition model at {path}, which does not "
            f"exist; unzip {ref}.zip there (see README 'Real weights'), or use "
            "synthetic:iresnet50 for a stand-in with the same architecture"
        )
    sha = file_sha256(path)
    if published and not sha.startswith(published):
        logger.warning(
            "%s: sha256 %s does not start with the published %s...; this is not the "
            "file the insightface release ships",
            path,
            sha[:16],
            published,
        )
    return ResolvedModel(
        ref=ref, model_id=f"{ref}/{Path(filename).stem}", path=str(path), sha256=sha, source="insightface"
    )


def _resolve_local(ref: str) -> ResolvedModel:
    path = Path(os.path.expanduser(ref))
    if not path.is_file():
        known = ", ".join(sorted(INSIGHTFACE_PACKS))
        raise ModelResolutionError(
            f"model {ref!r} is not a file, an s3:// URI, an insightface pack ({known}) or "
            "synthetic:<iresnet50|iresnet100|mobilefacenet|probe>"
        )
    return ResolvedModel(
        ref=ref, model_id=path.stem, path=str(path.resolve()), sha256=file_sha256(path), source="local"
    )


def resolve_model(
    ref: str,
    cache_dir: str | None = None,
    endpoint_url: str | None = None,
    region: str | None = None,
) -> ResolvedModel:
    """Turn ``ref`` into a ``ResolvedModel`` (generating or downloading as needed)."""
    if not isinstance(ref, str) or not ref.strip():
        raise ModelResolutionError(f"model reference must be a non-empty string, got {ref!r}")
    ref = ref.strip()
    cache = cache_root(cache_dir)
    if ref.startswith(SYNTHETIC_PREFIX):
        model = _resolve_synthetic(ref, cache)
    elif ref.startswith("s3://"):
        model = _resolve_s3(ref, cache, endpoint_url, region)
    elif ref in INSIGHTFACE_PACKS:
        model = _resolve_pack(ref)
    else:
        model = _resolve_local(ref)
    return _with_graph_facts(model)
