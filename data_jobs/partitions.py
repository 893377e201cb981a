"""Where an episode's files live in the output: ``<out>/<table>/episode_id=<episode>``.

Its own module because both the commit (which writes the partitions) and the Lance store
(which backfills from them) need it, and neither may import the other.
"""

from __future__ import annotations

from engines import Location

from .ids import require_safe_id


def partition(output: Location, table: str, episode: str) -> Location:
    """``<out>/<table>/episode_id=<episode>``, for a safe episode id only."""
    return output.join(table, f"episode_id={require_safe_id(episode)}")
