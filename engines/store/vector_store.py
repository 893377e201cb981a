"""A vector store: a directory of Lance tables (local path or ``s3://``) bound to one contract.

Vectors of two embedding contracts (another model, another preprocessing) are not
comparable, so a store is stamped with the contract it holds when it is created
(``_arcface_store.json``: contract, model id, dimension), and every table's Arrow schema
carries it too (``arcface.contract``). Opening a store for another contract, or a
directory of Lance tables without a stamp, is refused before any work with a message
naming both contracts.

The class holds strings only, so it travels to Ray tasks: vectors are written where they
are (``write_fragments``, in a task on the cluster) and only the fragments' metadata
(a few hundred bytes each) comes back to whoever commits them (``append``). That split,
the stamp and the S3 settings are what any sink of vectors needs: the episode job's
(``lance_store.py``) and a gallery of known identities alike. ``pylance`` writes and
indexes; ``lancedb`` reads the same directory (README "Vector store").
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from ..errors import ConfigError
from .storage import exists, list_files, locate, read_bytes, write_atomic

logger = logging.getLogger(__name__)

STAMP = "_arcface_store.json"
STORE_FORMAT = "arcface-ray vector store"
CONTRACT_KEY = b"arcface.contract"
LANCE_EXTRA = "pip install 'arcface-ray[lance]'"


def import_lance():
    """``lance`` (the pylance package), or an error naming the extra that provides it."""
    try:
        import lance
    except ImportError as exc:
        raise ConfigError(f"the Lance vector store needs pylance and lancedb: {LANCE_EXTRA}") from exc
    return lance


def lance_storage_options(uri: str, endpoint_url: str | None, region: str | None) -> dict[str, str]:
    """Lance's object-store settings for ``uri``: the job's S3 endpoint and region (credentials
    come from the usual AWS environment variables); nothing for a local path."""
    if not uri.startswith("s3://"):
        return {}
    options = {"aws_region": region or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"}
    if endpoint_url:
        options["aws_endpoint"] = endpoint_url
        if endpoint_url.startswith("http://"):
            options["allow_http"] = "true"
    return options


@dataclass(frozen=True)
class VectorStore:
    """Lance tables under ``uri`` (``<uri>/<name>.lance``) holding vectors of ``contract``."""

    uri: str
    contract: str
    endpoint_url: str | None = None
    region: str | None = None

    @property
    def storage_options(self) -> dict[str, str]:
        return lance_storage_options(self.uri, self.endpoint_url, self.region)

    def table_uri(self, name: str) -> str:
        if not uri_part_ok(name):
            raise ValueError(f"table name {name!r} must be a plain name")
        return f"{self.uri.rstrip('/')}/{name}.lance"

    def _root(self):
        local = self.uri if self.uri.startswith("s3://") else os.path.abspath(os.path.expanduser(self.uri))
        return locate(local, self.endpoint_url, self.region)

    # ---- the contract stamp ----

    def open(self, model_id: str, dim: int) -> VectorStore:
        """Check the stamp (creating it for a new store); refuse another contract."""
        root = self._root()
        stamp = root.join(STAMP)
        if exists(stamp):
            try:
                meta = json.loads(read_bytes(stamp.fs, stamp.path))
            except (OSError, ValueError) as exc:
                raise ConfigError(f"vector store {self.uri}: unreadable {STAMP} ({exc})") from None
            if meta.get("contract") != self.contract:
                raise ConfigError(
                    f"vector store {self.uri} holds embedding contract {meta.get('contract')} (model "
                    f"{meta.get('model_id')}); this run uses contract {self.contract} (model {model_id}). "
                    "Vectors of different contracts are not comparable: use another store"
                )
            return self
        tables = [i.path for i in list_files(root) if ".lance/" in i.path]
        if tables:
            raise ConfigError(
                f"vector store {self.uri} holds Lance tables but no {STAMP}: not a store of "
                "this project (its contract is unknown); use another store"
            )
        meta = {
            "format": STORE_FORMAT,
            "version": 1,
            "contract": self.contract,
            "model_id": model_id,
            "embedding_dim": dim,
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        write_atomic(stamp.fs, stamp.path, json.dumps(meta, indent=2).encode())
        logger.info("created vector store %s (contract %s)", self.uri, self.contract)
        return self

    def read_stamp(self) -> dict[str, Any] | None:
        """The store's stamp (contract, model id, dimension), or None for a store not created yet:
        what a reader that has no engine (``arcface gallery ls``) learns the contract from."""
        stamp = self._root().join(STAMP)
        if not exists(stamp):
            return None
        try:
            return json.loads(read_bytes(stamp.fs, stamp.path))
        except (OSError, ValueError) as exc:
            raise ConfigError(f"vector store {self.uri}: unreadable {STAMP} ({exc})") from None

    # ---- tables ----

    def overwrite(self, name: str, table: pa.Table):
        """Replace every row of ``name`` with ``table`` (created if new): one new Lance version,
        committed atomically, so a reader sees the old rows or the new ones, never a mix. For small
        tables rewritten whole (a gallery's identities and members), not for vectors of a job."""
        lance = import_lance()
        table = table.replace_schema_metadata(self.stamped(table.schema).metadata)
        return lance.write_dataset(table, self.table_uri(name), schema=table.schema, mode="overwrite",
                                   storage_options=self.storage_options)

    def stamped(self, schema: pa.Schema) -> pa.Schema:
        return schema.with_metadata({**(schema.metadata or {}), CONTRACT_KEY: self.contract.encode()})

    def dataset(self, name: str):
        """The Lance dataset ``name``, or None if it does not exist; refused if another contract."""
        lance = import_lance()
        try:
            ds = lance.dataset(self.table_uri(name), storage_options=self.storage_options)
        except (ValueError, OSError, RuntimeError):  # Lance: "Dataset at path ... was not found"
            return None
        theirs = (ds.schema.metadata or {}).get(CONTRACT_KEY)
        if theirs is not None and theirs.decode() != self.contract:
            raise ConfigError(
                f"Lance table {self.table_uri(name)} holds contract {theirs.decode()}, not {self.contract}"
            )
        return ds

    def create(self, name: str, schema: pa.Schema):
        """The table ``name``, created empty with ``schema`` (stamped) if it does not exist."""
        ds = self.dataset(name)
        if ds is not None:
            return ds
        lance = import_lance()
        schema = self.stamped(schema)
        return lance.write_dataset(
            schema.empty_table(),
            self.table_uri(name),
            schema=schema,
            mode="create",
            storage_options=self.storage_options,
        )

    def write_fragments(self, name: str, table: pa.Table) -> list[Any]:
        """Write ``table``'s rows as new data files of ``name`` (not yet part of it): on the caller's
        node, so vectors never travel; returns the fragments' metadata for ``append``."""
        from lance.fragment import write_fragments

        import_lance()
        return write_fragments(
            table, self.table_uri(name), schema=table.schema, storage_options=self.storage_options
        )

    def append(self, name: str, fragments: list[Any]) -> None:
        """Make ``fragments`` (from ``write_fragments``) part of table ``name``: one new version."""
        if not fragments:
            return
        lance = import_lance()
        ds = self.dataset(name)
        lance.LanceDataset.commit(
            self.table_uri(name),
            lance.LanceOperation.Append(fragments),
            read_version=ds.version,
            storage_options=self.storage_options,
        )

    def append_table(self, name: str, table: pa.Table) -> None:
        """Append a small table from this process (bookkeeping rows, not vectors)."""
        lance = import_lance()
        lance.write_dataset(table, self.table_uri(name), mode="append", storage_options=self.storage_options)

    def build_index(self, name: str, column: str, index_type: str = "IVF_FLAT", partitions: int = 0) -> int:
        """(Re)build a cosine ANN index on ``column`` of ``name`` over every row; ``partitions`` 0:
        about sqrt(rows). Returns the rows indexed (0: empty table, no index)."""
        ds = self.dataset(name)
        rows = ds.count_rows() if ds is not None else 0
        if not rows:
            return 0
        parts = min(rows, partitions or max(1, round(math.sqrt(rows))))
        kwargs: dict[str, Any] = {"num_partitions": parts}
        if index_type == "IVF_PQ":
            dim = ds.schema.field(column).type.list_size
            kwargs["num_sub_vectors"] = max(1, dim // 8)
        ds.create_index(column, index_type=index_type, metric="cosine", replace=True, **kwargs)
        logger.info("built %s index on %s.%s: %d rows, %d partitions", index_type, name, column, rows, parts)
        return rows


def uri_part_ok(name: str) -> bool:
    return bool(name) and name.replace("_", "").isalnum()
