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
