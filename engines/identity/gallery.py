"""A gallery of known identities: one quality-weighted template per identity, plus its members.

Stored as two Lance tables in a ``VectorStore`` (local path or ``s3://``), so the store's
contract stamp guards it: enrolling or searching with an engine of another embedding
contract is refused before any work, naming both contracts.

- ``identities``: ``identity`` (string), ``template`` (D float32, unit norm), ``members``
  (int64), ``mean_norm`` (float32), ``contract`` (string); one row per identity.
- ``members``: ``identity``, ``source`` (the file or manifest row it came from),
  ``embedding`` (D float32, unit norm), ``norm`` (float32, before normalisation).

The template is ``normalise(sum_i norm_i * e_i)`` over an identity's members (the episode
job's ``template_weighting: norm``; ``uniform`` is the plain mean): a sharp photo weighs
more than a blurred one. Both tables are small (one row per identity or per photo) and are
rewritten whole on each change as one new Lance version each, members first: a reader
sees a consistent version, and the ``identities`` version number is the gallery version a
server watches to reload. Enrolling a ``(identity, source)`` pair again replaces that member,
so a re-run never duplicates one.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from ..errors import ConfigError
from ..store.vector_store import VectorStore

logger = logging.getLogger(__name__)

IDENTITIES = "identities"
MEMBERS = "members"
# Names end up in paths, SQL-free Lance filters and tables: a conservative alphabet.
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
WEIGHTINGS = ("norm", "uniform")


def check_identity_name(name: str) -> str:
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
        raise ValueError(f"identity name {name!r} must match {NAME_PATTERN.pattern} "
                         "(letters, digits, '.', '_', '-'; at most 128 characters)")
    return name


def template_weights(norms: np.ndarray, weighting: str, counted: np.ndarray | None = None) -> np.ndarray:
    """Each row's weight in its template: its pre-normalisation norm (``norm``) or 1 (``uniform``),
    0 where ``counted`` is False. The episode job's track templates and the gallery share it."""
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
    weights = norms.astype(np.float64) if weighting == "norm" else np.ones(len(norms))
    return weights if counted is None else np.where(counted, weights, 0.0)


def weighted_templates(codes: np.ndarray, embeddings: np.ndarray, weights: np.ndarray,
                       groups: int) -> np.ndarray:
    """``(groups, D)`` unit templates: row g is ``normalise(sum w_i e_i)`` over the rows with
    ``codes == g`` (an empty or zero-weight group stays all zeros)."""
    sums = np.zeros((groups, embeddings.shape[1]), np.float64)
    np.add.at(sums, codes, embeddings * weights[:, None])
    lengths = np.linalg.norm(sums, axis=1, keepdims=True)
    return (sums / np.where(lengths > 0, lengths, 1.0)).astype(np.float32)


def _vectors(column: pa.ChunkedArray | pa.Array, rows: int, dim: int) -> np.ndarray:
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks() if column.num_chunks else pa.array([], pa.list_(pa.float32(), dim))
    return column.flatten().to_numpy(zero_copy_only=False).reshape(rows, dim).astype(np.float32)


@dataclass(frozen=True)
class Gallery:
    """A loaded gallery: ``names[i]`` has unit template ``templates[i]`` built from ``members[i]``
    photos. ``version`` is the Lance version of the ``identities`` table (0: none yet)."""

    names: tuple[str, ...]
    templates: np.ndarray  # (K, D) float32
    members: np.ndarray  # (K,) int64
    contract: str
    version: int

    def __len__(self) -> int:
        return len(self.names)

    @property
    def dim(self) -> int:
        return int(self.templates.shape[1])


def open_gallery_store(uri: str, contract: str, model_id: str, dim: int, endpoint_url: str | None = None,
                       region: str | None = None) -> VectorStore:
    """The gallery's store at ``uri`` for ``contract`` (created, stamped, if new); another contract's
    gallery is refused naming both."""
    return VectorStore(uri, contract, endpoint_url, region).open(model_id, dim)


def gallery_version(store: VectorStore) -> int:
    """The ``identities`` table's latest version (0: no gallery yet): cheap, reads no vectors."""
    ds = store.dataset(IDENTITIES)
    return 0 if ds is None else int(ds.version)


def load_gallery(store: VectorStore, dim: int) -> Gallery:
    """Every identity's template (an empty gallery when nothing is enrolled yet)."""
    ds = store.dataset(IDENTITIES)
    if ds is None:
        return Gallery((), np.zeros((0, dim), np.float32), np.zeros(0, np.int64), store.contract, 0)
    table = ds.to_table(columns=["identity", "template", "members"])
    stored = table.schema.field("template").type.list_size
    if stored != dim:
        raise ConfigError(f"gallery {store.uri} holds {stored}-d templates; the engine makes {dim}-d vectors")
    order = np.argsort(np.asarray(table["identity"].to_pylist(), dtype=object), kind="stable")
    table = table.take(pa.array(order, pa.int64())) if table.num_rows else table
    return Gallery(tuple(table["identity"].to_pylist()), _vectors(table["template"], table.num_rows, dim),
                   table["members"].to_numpy().astype(np.int64), store.contract, int(ds.version))


def read_members(store: VectorStore) -> pa.Table | None:
    ds = store.dataset(MEMBERS)
    return None if ds is None else ds.to_table()


def _members_schema(dim: int) -> pa.Schema:
    return pa.schema([("identity", pa.string()), ("source", pa.string()),
                      ("embedding", pa.list_(pa.float32(), dim)), ("norm", pa.float32())])


def _write(store: VectorStore, members: pa.Table, dim: int, weighting: str) -> pa.Table:
    """Rewrite both tables from ``members``: members first, then the templates built from them."""
    store.overwrite(MEMBERS, members)
    names, codes = np.unique(np.asarray(members["identity"].to_pylist(), dtype=object), return_inverse=True)
    emb = _vectors(members["embedding"], members.num_rows, dim)
    norms = members["norm"].to_numpy(zero_copy_only=False).astype(np.float64)
    templates = weighted_templates(codes, emb, template_weights(norms, weighting), len(names))
    counts = np.bincount(codes, minlength=len(names)) if len(names) else np.zeros(0, np.int64)
    mean_norm = np.bincount(codes, weights=norms, minlength=len(names)) / np.maximum(counts, 1)
    identities = pa.table({
        "identity": pa.array([str(n) for n in names], pa.string()),
        "template": pa.FixedSizeListArray.from_arrays(pa.array(templates.reshape(-1), pa.float32()), dim),
        "members": pa.array(counts, pa.int64()),
        "mean_norm": pa.array(mean_norm.astype(np.float32)),
        "contract": pa.array([store.contract] * len(names), pa.string()),
    })
    store.overwrite(IDENTITIES, identities)
    return identities


def enroll(store: VectorStore, identities: Sequence[str], sources: Sequence[str], embeddings: np.ndarray,
           norms: np.ndarray, weighting: str = "norm") -> pa.Table:
    """Add members (row i: photo ``sources[i]`` of ``identities[i]``, unit ``embeddings[i]`` with
    pre-normalisation ``norms[i]``) and rebuild the templates; returns the new identities table.
    A ``(identity, source)`` already enrolled is replaced, not duplicated."""
    n = len(identities)
    if embeddings.ndim != 2 or embeddings.shape[0] != n or len(sources) != n or norms.shape != (n,):
        rows = embeddings.shape[0] if embeddings.ndim else "?"
        raise ValueError(f"enroll needs as many identities ({n}), sources ({len(sources)}), embeddings "
                         f"({rows}) and norms ({norms.shape}) rows")
    if not n:
        raise ValueError("nothing to enroll: no faces given")
    for name in set(identities):
        check_identity_name(name)
    dim = embeddings.shape[1]
    new = pa.table({"identity": pa.array(list(identities), pa.string()),
                    "source": pa.array([str(s) for s in sources], pa.string()),
                    "embedding": pa.FixedSizeListArray.from_arrays(
                        pa.array(np.ascontiguousarray(embeddings, np.float32).reshape(-1)), dim),
                    "norm": pa.array(np.asarray(norms, np.float32))}, schema=_members_schema(dim))
    keys = set(zip(identities, map(str, sources), strict=True))
    if len(keys) < n:
        raise ValueError("the same (identity, source) appears twice in one enrollment")
    old = read_members(store)
    if old is not None and old.num_rows:
        old = old.select(new.schema.names).cast(new.schema)
        kept = [(i, s) not in keys for i, s in zip(old["identity"].to_pylist(), old["source"].to_pylist(),
                                                  strict=True)]
        new = pa.concat_tables([old.filter(pa.array(kept)), new])
    table = _write(store, new, dim, weighting)
    logger.info("gallery %s: %d identities, %d members", store.uri, table.num_rows, new.num_rows)
    return table


def remove(store: VectorStore, names: Sequence[str], dim: int, weighting: str = "norm") -> pa.Table:
    """Remove identities ``names`` (each must be enrolled) with their members."""
    members = read_members(store)
    present = set(members["identity"].to_pylist()) if members is not None else set()
    missing = sorted(set(names) - present)
    if missing:
        raise ValueError(f"not in gallery {store.uri}: {', '.join(missing)} "
                         f"(enrolled: {', '.join(sorted(present)[:20]) or 'none'})")
    kept = pa.array([i not in set(names) for i in members["identity"].to_pylist()])
    return _write(store, members.filter(kept), dim, weighting)
