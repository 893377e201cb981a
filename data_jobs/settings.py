"""Typed settings of the episode job (``config/episodes.yaml``, overridden by flags)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
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


def load_job_settings(path: str | Path | None = None, **overrides: Any) -> EpisodeJobSettings:
    """``config/episodes.yaml`` (or ``path``), then non-None ``overrides``."""
    path = Path(path) if path else DEFAULT_EPISODES_CONFIG
    raw = read_yaml_mapping(path, "episode job config")
    if set(raw) - {"episodes"}:
        raise ConfigError(f"{path}: expected a single top-level 'episodes' mapping")
    try:
        settings = build_typed(EpisodeJobSettings, raw.get("episodes") or {}, "episodes")
        settings = replace(settings, **{k: v for k, v in overrides.items() if v is not None})
        if settings.actors_min > settings.actors_max:
            raise ConfigError(
                f"episodes.actors_min ({settings.actors_min}) must be <= actors_max ({settings.actors_max})"
            )
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    return settings
