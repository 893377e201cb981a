"""Typed settings of the episode job (``config/episodes.yaml``, overridden by flags)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engines import REPO_CONFIG_DIR, ConfigError, build_typed, read_yaml_mapping

DEFAULT_EPISODES_CONFIG = REPO_CONFIG_DIR / "episodes.yaml"


@dataclass(frozen=True)
class EpisodeJobSettings:
    batch_size: int = field(default=128, metadata={"min": 1})
    decode_batch_size: int = field(default=64, metadata={"min": 1})
    actors_min: int = field(default=1, metadata={"min": 1})
    actors_max: int = field(default=1, metadata={"min": 1})
    actor_num_gpus: float = field(default=0.0, metadata={"min": 0.0})
    # GPU type every EmbedActor needs (Ray's accelerator_type, e.g. "A10G", "A100", "H100"):
    # one GPU family per job means one TensorRT engine build per job. None: any node.
    actor_accelerator_type: str | None = None
    actor_num_cpus: float = field(default=1.0, metadata={"min": 0.0})
    decode_num_cpus: float = field(default=0.5, metadata={"min": 0.0})
    write_num_cpus: float = field(default=0.25, metadata={"min": 0.0})
    max_tasks_in_flight_per_actor: int = field(default=2, metadata={"min": 1})
    execution_no_progress_timeout_s: float = 3600.0
    image_extensions: tuple[str, ...] = ("jpg", "jpeg", "png")
    # Per-row limits on untrusted inputs; a row past one is an error row, never a failed job.
    # Declared width x height above which a file is not decoded (the service's default too):
    # decoding allocates 3 bytes per declared pixel, whatever the file's size.
    max_image_pixels: int = field(default=40_000_000, metadata={"min": 1})
    # Largest file (or inline image) read, MiB: the size is checked before reading, and no
    # more than this is ever read (a /dev/zero-like path never ends).
    max_file_mb: float = field(default=64.0, metadata={"min": 0.001})
    # Wall-clock limit on reading one object from S3, seconds (an endpoint that stalls or
    # trickles): the row becomes a read_timeout error. 0: no limit.
    read_timeout_s: float = field(default=60.0, metadata={"min": 0.0})
    # Templates (quality.py): a crop counts toward its track's template when its pre-normalisation
    # norm is >= min_quality (0: every crop), and only the max_crops_per_track best of those by norm
    # (0: no cap); template_weighting "norm" weights each counted crop by its norm, "uniform" not.
    min_quality: float = field(default=0.0, metadata={"min": 0.0})
    max_crops_per_track: int = field(default=0, metadata={"min": 0})
    template_weighting: str = field(default="norm", metadata={"choices": ("norm", "uniform")})
    # Episode commits: Ray tasks that start as soon as an episode's rows are all staged.
    commit_num_cpus: float = field(default=0.25, metadata={"min": 0.0})
    # Progress: the live line (tqdm on a terminal, else a log line) and <output>/progress.json,
    # rewritten at most every progress_interval_s seconds and once more at the end.
    progress_interval_s: float = field(default=10.0, metadata={"min": 0.1})
    # Optional Lance vector store (lance_store.py): a local path or s3:// URI; null: Parquet only.
    lance_uri: str | None = None
    # ANN index built on the store's track templates when a job ends: IVF_FLAT (exact within the
    # partitions probed), IVF_PQ or IVF_HNSW_SQ (compressed: use a refine_factor); partitions 0:
    # about sqrt(tracks).
    lance_index_type: str = field(default="IVF_FLAT",
                                  metadata={"choices": ("IVF_FLAT", "IVF_PQ", "IVF_HNSW_SQ")})
    lance_index_partitions: int = field(default=0, metadata={"min": 0})
    # Store commits (fragment metadata only: vectors are written by the commit tasks) batch the
    # episodes committed in this many seconds into one version of each table.
    lance_commit_interval_s: float = field(default=5.0, metadata={"min": 0.0})
    # The worker pool of a local Ray the job starts itself (no RAY_ADDRESS): Ray keeps at most
    # num_cpus idle workers and kills the others after 1 s idle, while the job's fractional-CPU
    # tasks (decode 0.5, write and commit 0.25) run up to 8 at once on 2 CPUs, so workers were
    # killed and restarted (imports: seconds of CPU each) all job long. Keep up to this many,
    # idle this long. On a cluster, set them where the raylets start (README "Offline job").
    local_worker_soft_limit: int = field(default=16, metadata={"min": 1})
    local_idle_worker_keep_s: float = field(default=600.0, metadata={"min": 1.0})
    # Placement audit: a local directory where each EmbedActor appends one JSON line per batch
    # (its Ray node, pid, backend, device and the uids it embedded), to check on a cluster which
    # nodes embedded what. null: off.
    placement_log_dir: str | None = None


def load_job_settings(path: str | Path | None = None, **overrides: Any) -> EpisodeJobSettings:
    """``config/episodes.yaml`` (or ``path``), then non-None ``overrides``."""
    path = Path(path) if path else DEFAULT_EPISODES_CONFIG
    raw = read_yaml_mapping(path, "episode job config")
    if set(raw) - {"episodes"}:
        raise ConfigError(f"{path}: expected a single top-level 'episodes' mapping")
    try:
        merged = {**(raw.get("episodes") or {}), **{k: v for k, v in overrides.items() if v is not None}}
        settings = build_typed(EpisodeJobSettings, merged, "episodes")
        if settings.actors_min > settings.actors_max:
            raise ConfigError(
                f"episodes.actors_min ({settings.actors_min}) must be <= actors_max ({settings.actors_max})"
            )
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    return settings


def local_ray_system_config(settings: EpisodeJobSettings) -> dict[str, int]:
    """Ray ``_system_config`` of a local Ray the job starts: its worker pool kept alive."""
    return {
        "num_workers_soft_limit": settings.local_worker_soft_limit,
        "idle_worker_killing_time_threshold_ms": int(settings.local_idle_worker_keep_s * 1000),
    }
