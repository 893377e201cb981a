"""Resolve an engine key to verified plan bytes: local cache -> S3 -> build under a lock -> upload.

``get_or_build_plan`` is the sentence the TensorRT backend reads:

1. the local cache (``<cache_dir>/engines``), checked against the sidecar's sha256;
2. under a file lock (one process per host does the rest): S3, downloaded
   atomically and verified; a plan whose checksum does not match is discarded
   and fetched again, then rebuilt;
3. otherwise the S3 build lock (exactly one builder per key across hosts; the
   others poll for the sidecar), then the build step, then the upload.

S3 unreachable: build locally with a warning. ``build_locally: false`` and no
engine anywhere: ``BackendUnavailable``, so the fallback chain moves on.

Every plan found (local or S3) is also checked against the host from its
sidecar (``plan_key.plan_mismatch``); one built elsewhere is rebuilt, never
loaded. A verified plan that TensorRT then refuses to deserialise is
quarantined (``<cache>/engines/quarantine/``, with what TensorRT said) and
rebuilt once, on this host only (``load_with_one_rebuild``); the S3 copy is left
as it is, since the key already rules out the usual causes and other hosts
may load it.

The build step is a parameter (``build``, default ``builder.build_plan``):
the only seam, so the cache and its locks are tested with real processes
against a real S3 API while the builder stays the real one everywhere else.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TypeVar

from ..errors import BackendUnavailable, ChecksumMismatch, EngineBuildError, PlanLoadError
from ..models.precision import convert_model
from ..models.resolve import ResolvedModel, cache_root
from ..s3 import sha256_file
from .builder import BuildJob
from .plan_key import BuildSettings, BuildTarget, detect_build_target, plan_key, plan_mismatch
from .plan_store import S3PlanStore, StoreUnreachable

logger = logging.getLogger(__name__)

BuildFn = Callable[[BuildJob], "dict[str, Any] | None"]
# (fp32 source, converted graph) -> a drift report dict (``drift_gate.conversion_drift``)
DriftFn = Callable[[ResolvedModel, ResolvedModel], "dict[str, Any]"]
SIDECAR_FORMAT = 2  # 2: tensorrt_cuda_major, device_tag, hardware_compatibility
_FROM_CONFIG: Any = object()
Loaded = TypeVar("Loaded")


@dataclass(frozen=True)
class CachedPlan:
    """A plan in the local cache whose bytes matched its sidecar when found."""

    key: str
    path: Path
    sidecar: dict[str, Any]
    source: str  # local | s3 | built
    graph: ResolvedModel | None = field(default=None, compare=False)

    def read_verified(self) -> bytes:
        """The plan bytes, hashed again as read: a plan is code, load only what was published."""
        import hashlib

        data = self.path.read_bytes()
        actual = hashlib.sha256(data).hexdigest()
        if actual != self.sidecar["sha256"]:
            raise ChecksumMismatch(
                f"{self.path}: sha256 {actual} does not match its sidecar ({self.sidecar['sha256']}); "
                "the file changed after it was verified; delete it and start again"
            )
        return data


class LocalPlanCache:
    """``<root>/KEY`` + ``<root>/KEY.json``; writes are atomic renames under a per-key file lock."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    @classmethod
    def for_storage(cls, storage: Any) -> LocalPlanCache:
        return cls(cache_root(storage.cache_dir) / "engines")

    def plan_path(self, key: str) -> Path:
        return self.root / key

    def sidecar_path(self, key: str) -> Path:
        return self.root / (key + ".json")

    def timing_cache_path(self, target: BuildTarget) -> Path:
        """Per TensorRT build and device model: a timing cache is as specific as a plan."""
        name = f"trt{target.trt_version}-{target.cuda_tag}-{target.sm}-{target.device_tag}.cache"
        return self.root / "timing" / name

    def lock(self, key: str, timeout: float):
        from filelock import FileLock

        (self.root / ".locks").mkdir(parents=True, exist_ok=True)
        return FileLock(str(self.root / ".locks" / (key + ".lock")), timeout=timeout)

    def get(self, key: str, source: str = "local") -> CachedPlan | None:
        """The entry if both files are there and the plan hashes to the sidecar's sha256."""
        plan, side = self.plan_path(key), self.sidecar_path(key)
        if not (plan.is_file() and side.is_file()):
            return None
        try:
            sidecar = json.loads(side.read_text())
            expected = sidecar["sha256"]
        except (OSError, ValueError, KeyError, TypeError):
            return None
        if sha256_file(plan) != expected:
            return None
        return CachedPlan(key, plan, sidecar, source)

    def discard(self, key: str, reason: str) -> None:
        """Remove a plan that failed verification (or a half-written pair); call under the lock."""
        present = [p for p in (self.plan_path(key), self.sidecar_path(key)) if p.exists()]
        if present:
            logger.warning("discarding cached engine %s: %s", key, reason)
        for path in present:
            path.unlink(missing_ok=True)

    def quarantine(self, key: str, reason: str, seen: list[str] | None = None) -> Path:
        """Move a plan TensorRT refused (and its sidecar) out of the cache, with why; call under the lock.

        ``<root>/quarantine/<key>.<utc time>/`` keeps the bytes for a look; nothing
        ever loads from there, and the key is free for a rebuild.
        """
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")
        where = self.root / "quarantine" / f"{key}.{stamp}"
        where.mkdir(parents=True, exist_ok=True)
        for path in (self.plan_path(key), self.sidecar_path(key)):
            if path.exists():
                os.replace(path, where / path.name)
        (where / "reason.json").write_text(json.dumps(
            {"key": key, "reason": reason, "tensorrt_said": list(seen or []),
             "quarantined_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
             "host": socket.gethostname()}, indent=2))
        logger.warning("quarantined engine %s in %s: %s", key, where, reason)
        return where

    def write_sidecar(self, key: str, sidecar: dict[str, Any]) -> None:
        side = self.sidecar_path(key)
        tmp = side.with_name(f".{side.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(sidecar, indent=2, sort_keys=True))
        os.replace(tmp, side)

    def entries(self) -> list[dict[str, Any]]:
        if not self.root.is_dir():
            return []
        out = []
        for plan in sorted(self.root.glob("*.plan")):
            entry = self.get(plan.name)
            out.append({"key": plan.name, "size": plan.stat().st_size, "path": str(plan),
                        "verified": entry is not None,
                        "sha256": entry.sidecar["sha256"] if entry else None})
        return out


def make_sidecar(key: str, plan: Path, graph: ResolvedModel, settings: BuildSettings,
                 target: BuildTarget, build_facts: dict[str, Any] | None) -> dict[str, Any]:
    return {
        "format": SIDECAR_FORMAT,
        "key": key,
        "sha256": sha256_file(plan),
        "size": plan.stat().st_size,
        "model_id": graph.model_id,
        "graph_sha256": graph.sha256,
        "source_sha256": graph.contract_sha256,
        "precision": settings.precision,
        "builder_settings": settings.to_dict(),
        "gpu_name": target.gpu_name,
        "device_tag": target.device_tag,
        "compute_capability": target.to_dict()["compute_capability"],
        "hardware_compatibility": settings.hardware_compatibility,
        "tensorrt_version": target.trt_version,
        "tensorrt_cuda_major": target.trt_cuda_major,
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "built_on": socket.gethostname(),
        "build": build_facts or {},
    }


@dataclass
class _Resolution:
    """One call of ``get_or_build_plan``: what it needs, in one place."""

    key: str
    graph: ResolvedModel
    settings: BuildSettings
    target: BuildTarget
    local: LocalPlanCache
    build: BuildFn
    device_id: int
    trt_cfg: Any
    poll_s: float
    source: ResolvedModel | None = None
    measure_drift: DriftFn | None = None
    corrupt: set[str] = field(default_factory=set)

    def graph_drift(self) -> dict[str, Any] | None:
        """The converted graph's drift against the fp32 source, on this CPU, before building."""
        if (self.measure_drift is None or self.source is None or self.graph.precision == "fp32"
                or self.graph.path == self.source.path):
            return None
        report = self.measure_drift(self.source, self.graph)
        if not report["passed"]:
            logger.warning(
                "building %s from a %s graph that drifts from fp32 on the CPU (min cosine %.6f < %.6f); "
                "the runtime drift gate decides whether it serves", self.key, self.graph.precision,
                report["min_cosine_sim"], 1.0 - report["max_drift"],
            )
        return report

    def build_here(self) -> CachedPlan:
        drift = self.graph_drift()
        plan = self.local.plan_path(self.key)
        tmp = plan.with_name(f".{plan.name}.{os.getpid()}.building")
        job = BuildJob(self.key, self.graph.path, self.settings, self.target, tmp,
                       self.local.timing_cache_path(self.target), self.device_id)
        started = time.perf_counter()
        try:
            facts = dict(self.build(job) or {})
            if not tmp.is_file() or tmp.stat().st_size == 0:
                raise EngineBuildError(f"the build step wrote no plan to {tmp}")
            facts.setdefault("build_seconds", round(time.perf_counter() - started, 3))
            if drift is not None:
                facts["graph_drift"] = {k: v for k, v in drift.items() if not k.startswith("histogram")}
            sidecar = make_sidecar(self.key, tmp, self.graph, self.settings, self.target, facts)
            os.replace(tmp, plan)
        finally:
            tmp.unlink(missing_ok=True)
        self.local.write_sidecar(self.key, sidecar)
        logger.info("engine %s built in %.1f s", self.key, facts["build_seconds"])
        return CachedPlan(self.key, plan, sidecar, "built", self.graph)

    def fetch(self, store: S3PlanStore) -> CachedPlan | None:
        """Download the published plan, verified; a bad copy is retried once, then treated as absent."""
        sidecar = store.sidecar(self.key)
        if sidecar is None:
            return None
        mismatch = plan_mismatch(sidecar, self.target, self.settings)
        if mismatch:
            logger.warning("engine %s in S3 was %s; not loading it here (a build replaces it)", self.key,
                           mismatch)
            return None
        # a copy known bad is not downloaded again until the plan object changes (a re-upload)
        marker = f"{sidecar['sha256']}/{store.plan_etag(self.key)}"
        if marker in self.corrupt:
            return None
        for attempt in (1, 2):
            try:
                store.download(self.key, self.local.plan_path(self.key), sidecar["sha256"])
            except ChecksumMismatch as exc:
                logger.warning("engine %s from S3, attempt %d: %s", self.key, attempt, exc)
                continue
            self.local.write_sidecar(self.key, sidecar)
            logger.info("engine %s downloaded from %s", self.key, store.uri(self.key))
            return CachedPlan(self.key, self.local.plan_path(self.key), sidecar, "s3", self.graph)
        self.corrupt.add(marker)
        logger.warning("engine %s in S3 does not match its sidecar; it will be rebuilt", self.key)
        return None

    def via_store(self, store: S3PlanStore) -> CachedPlan:
        cfg = self.trt_cfg
        deadline = time.monotonic() + cfg.wait_timeout_s
        waiting_for = None
        while True:
            entry = self.fetch(store)
            if entry is not None:
                return entry
            if not cfg.build_locally:
                raise self.unavailable(f"or in {store.uri('')}")
            handle = store.try_lock(self.key, cfg.lock_ttl_s)
            state = None
            if handle is None:
                state = store.lock_state(self.key, cfg.lock_ttl_s)
                if state is not None and state.expired:
                    logger.warning("build lock for %s (host %s) is %.0f s old, past its %.0f s ttl: "
                                   "its builder died; taking over", self.key, state.host, state.age_s,
                                   state.ttl_s)
                    handle = store.take_over(self.key, state, cfg.lock_ttl_s)
            if handle is not None:
                return self.build_as_lock_holder(store, handle)
            if time.monotonic() > deadline:
                holder = f"host {state.host}" if state else "another host"
                raise EngineBuildError(
                    f"waited {cfg.wait_timeout_s:.0f} s for {holder} to build {self.key}; raise "
                    "tensorrt.wait_timeout_s, or check that host's logs"
                )
            if state is not None and state.owner != waiting_for:
                waiting_for = state.owner
                logger.info("host %s is building %s; waiting for its upload", state.host, self.key)
            time.sleep(self.poll_s)

    def build_as_lock_holder(self, store: S3PlanStore, handle: Any) -> CachedPlan:
        try:
            entry = self.fetch(store)  # published between our look and our lock?
            if entry is not None:
                return entry
            with store.heartbeat(handle):
                entry = self.build_here()
            try:
                store.upload(self.key, entry.path, entry.sidecar)
            except StoreUnreachable as exc:
                logger.warning("engine %s built but not shared (S3 unreachable): %s", self.key, exc)
            return entry
        finally:
            store.release(handle)

    def unavailable(self, where: str = "") -> BackendUnavailable:
        return BackendUnavailable(
            f"no TensorRT engine {self.key} in {self.local.root} {where}".rstrip()
            + " and tensorrt.build_locally is false; build it on a "
            f"{self.target.sm} host with `arcface build`, or set tensorrt.build_locally: true"
        )


def get_or_build_plan(
    model: ResolvedModel,
    trt_cfg: Any,
    *,
    target: BuildTarget | None = None,
    build: BuildFn | None = None,
    store: S3PlanStore | None = _FROM_CONFIG,
    device_id: int | None = None,
    poll_interval_s: float | None = None,
    measure_drift: DriftFn | None = None,
    rebuild: bool = False,
    prepare: Callable[[ResolvedModel], ResolvedModel] | None = None,
    quantization: Any = None,
) -> CachedPlan:
    """A verified local plan for ``model`` built as ``trt_cfg`` (a ``TensorRTConfig``) says.

    ``model`` is converted to ``trt_cfg.precision`` first (the key hashes the
    graph actually built). ``target`` defaults to detection on
    ``device_id`` (default ``trt_cfg.device_id``); ``store`` defaults to the
    one ``trt_cfg.storage`` describes (``None``: local only). Before a reduced
    precision graph is built here, its drift against ``model`` is measured on
    the CPU by ``measure_drift`` (the backend passes ``drift_gate.conversion_drift``) and
    recorded in the sidecar (``build.graph_drift``); serving is the runtime drift gate's call.
    ``rebuild``: build on this host whatever the caches hold (after a quarantine),
    sharing nothing through S3. ``prepare`` turns the converted graph into the one built (the
    backend passes the in-graph preprocessing: a uint8 input binding, a quarter of the bytes
    to the device); the key hashes the result. ``quantization`` (a ``QuantizationConfig``; default
    the config's defaults) is how an int8 graph is made: the same graph the CPU backends run.
    """
    device_id = trt_cfg.device_id if device_id is None else device_id
    storage = trt_cfg.storage
    graph = convert_model(model, trt_cfg.precision, cache_dir=storage.cache_dir, quantization=quantization)
    if prepare is not None:
        graph = prepare(graph)
    target = target or detect_build_target(device_id)
    settings = BuildSettings.from_config(trt_cfg)
    key = plan_key(graph, settings, target)
    local = LocalPlanCache.for_storage(storage)
    hit = None if rebuild else _usable(local, key, target, settings, locked=False)
    if hit is not None:
        return CachedPlan(hit.key, hit.path, hit.sidecar, "local", graph)
    if build is None:
        from .builder import build_plan as build
    poll = poll_interval_s or min(5.0, max(0.2, trt_cfg.lock_ttl_s / 10))
    res = _Resolution(key, graph, settings, target, local, build, device_id, trt_cfg, poll,
                      source=model, measure_drift=measure_drift)
    from filelock import Timeout

    try:
        with local.lock(key, timeout=trt_cfg.wait_timeout_s):
            hit = None if rebuild else _usable(local, key, target, settings, locked=True)
            if hit is not None:
                return CachedPlan(hit.key, hit.path, hit.sidecar, "local", graph)
            local.discard(key, "rebuild asked for" if rebuild else "plan and sidecar missing or not matching")
            if rebuild:
                return res.build_here()
            if store is _FROM_CONFIG:
                store = S3PlanStore.from_config(storage)
            if store is not None:
                try:
                    store.check()
                    return res.via_store(store)
                except StoreUnreachable as exc:
                    logger.warning("engine store unreachable, resolving %s on this host only: %s", key, exc)
            if not trt_cfg.build_locally:
                raise res.unavailable()
            return res.build_here()
    except Timeout:
        raise EngineBuildError(
            f"another process on this host held the build lock for {key} longer than "
            f"{trt_cfg.wait_timeout_s:.0f} s (tensorrt.wait_timeout_s)"
        ) from None


def _usable(local: LocalPlanCache, key: str, target: BuildTarget, settings: BuildSettings,
            locked: bool) -> CachedPlan | None:
    """The local entry for ``key`` if its bytes verify and its sidecar says it was built for this
    host; one built elsewhere is discarded when the caller holds the key's lock."""
    hit = local.get(key)
    if hit is None:
        return None
    mismatch = plan_mismatch(hit.sidecar, target, settings)
    if mismatch:
        if locked:
            local.discard(key, mismatch)
        return None
    return hit


def load_with_one_rebuild(
    resolve: Callable[[bool], CachedPlan],
    load: Callable[[CachedPlan], Loaded],
    local: LocalPlanCache,
    lock_timeout_s: float = 60.0,
) -> tuple[CachedPlan, Loaded]:
    """``load(resolve(False))``; a plan TensorRT refuses is quarantined and rebuilt once.

    ``resolve(rebuild)`` is ``get_or_build_plan`` bound to its arguments; ``load``
    deserialises (``TrtRunner``) and raises ``PlanLoadError``. A refusal that is the
    host's (out of device memory, the driver) keeps the plan and reports the
    backend unavailable with what was seen; a second refusal, of a plan built here
    a moment ago, is an ``EngineBuildError`` naming both.
    """
    entry = resolve(False)
    try:
        return entry, load(entry)
    except PlanLoadError as exc:
        if not exc.plan_at_fault:
            raise BackendUnavailable(f"{exc} (cause: {exc.cause}; the plan was kept)") from exc
        first = exc
    with local.lock(entry.key, timeout=lock_timeout_s):
        local.quarantine(entry.key, str(first), first.seen)
    logger.warning("engine %s (%s) did not deserialise; rebuilding it once on this host", entry.key,
                   entry.source)
    rebuilt = resolve(True)
    try:
        return rebuilt, load(rebuilt)
    except PlanLoadError as second:
        raise EngineBuildError(
            f"engine {rebuilt.key} does not deserialise even rebuilt on this host: {second}; "
            f"the first copy ({entry.source}) failed with: {first}"
        ) from second
