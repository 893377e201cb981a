"""Episodes commit as they finish: a tracker actor, and the driver loop that starts commit tasks.

The pipeline runs in a driver thread (``write_datasink`` blocks until the last row is
staged). Meanwhile:

- every staging write tells ``StagingTracker`` (a zero-CPU actor) which episode it added
  how many rows to, by file name, so a write Ray retries (same rows, same name) counts once;
- the driver polls it: an episode whose staged rows reach what this run owes it is
  handed to a commit task (``commit.commit_episode`` as a Ray task, on the cluster),
  which checks the uids itself; a hint that proves early (rows staged twice under two
  names) comes back ``incomplete`` with nothing written, and the episode waits for more;
- when the pipeline ends, every episode not yet committed gets a last commit, which
  must find all its rows (``IncompleteEpisode`` otherwise).

The driver sees counts and episode ids, never rows: what it holds grows with the number
of episodes, not of faces. It also feeds ``Progress`` and the Lance ``StoreCommitter``.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from engines import Location

from .commit import CommitOutcome, CommitRequest, EpisodeResult, IncompleteEpisode, commit_episode

logger = logging.getLogger(__name__)

POLL_S = 0.5


class StagingTracker:
    """Staged rows per episode (a Ray actor: see the module docstring)."""

    def __init__(self, owed: dict[str, int]) -> None:
        self.owed = dict(owed)  # episode -> rows this run must stage before it is worth committing
        self.files: dict[str, dict[str, int]] = {}
        self.rows = self.good = 0
        self.handed: set[str] = set()

    def staged(self, episode: str, name: str, rows: int, good: int) -> None:
        files = self.files.setdefault(episode, {})
        if name in files:
            return
        files[name] = rows
        self.rows += rows
        self.good += good

    def _staged(self, episode: str) -> int:
        return sum(self.files.get(episode, {}).values())

    def poll(self) -> tuple[list[str], int, int]:
        """(episodes ready to commit, not handed out before; rows staged; good rows staged)."""
        ready = [ep for ep, n in self.owed.items() if ep not in self.handed and self._staged(ep) >= n]
        self.handed.update(ready)
        return ready, self.rows, self.good

    def retry(self, episode: str, missing: int) -> None:
        """A commit found ``missing`` rows not staged yet: hand it out again once that many more are."""
        self.owed[episode] = self._staged(episode) + missing
        self.handed.discard(episode)


@dataclass
class CommitScheduler:
    output: Location
    episodes: list[str]  # the episodes to commit
    make_request: Callable[[str], CommitRequest]  # built when its commit starts (one episode's uids)
    owed: dict[str, int]  # episode -> rows this run stages for it
    num_cpus: float = 0.25
    progress: Any = None  # progress.Progress
    store: Any = None  # lance_store.StoreCommitter
    results: dict[str, EpisodeResult] = field(default_factory=dict)

    def run(self, pipeline: Callable[[Any], None]) -> dict[str, EpisodeResult]:
        """Run ``pipeline(tracker)`` in a thread and commit episodes as they finish; returns every
        episode's result, or raises the pipeline's error (after the commits in flight end) or
        ``IncompleteEpisode`` for episodes whose rows never all arrived."""
        import ray

        tracker = ray.remote(StagingTracker).options(num_cpus=0).remote(self.owed)
        task = ray.remote(commit_episode).options(num_cpus=self.num_cpus, max_retries=3)
        failure: list[BaseException] = []

        def body() -> None:
            try:
                pipeline(tracker)
            except BaseException as exc:  # re-raised on the driver's thread
                failure.append(exc)

        thread = threading.Thread(target=body, name="episode-pipeline", daemon=True)
        thread.start()
        in_flight: dict[Any, str] = {}
        final_tried: set[str] = set()  # handed out after the pipeline ended: their last chance
        incomplete: dict[str, int] = {}
        while True:
            finished = not thread.is_alive()
            ready, rows, good = ray.get(tracker.poll.remote())
            if finished:
                busy = set(in_flight.values())
                ready = (
                    []
                    if failure
                    else [
                        ep
                        for ep in self.episodes
                        if ep not in self.results and ep not in busy and ep not in final_tried
                    ]
                )
                final_tried.update(ready)
            for ep in ready:
                if ep not in self.results and ep not in in_flight.values():
                    in_flight[task.remote(self.output, self.make_request(ep))] = ep
            done = (
                ray.wait(list(in_flight), num_returns=len(in_flight), timeout=POLL_S)[0] if in_flight else []
            )
            committed = []
            for ref in done:
                outcome: CommitOutcome = ray.get(ref)
                ep = in_flight.pop(ref)
                if outcome.result is not None:
                    self._committed(outcome)
                    committed.append(ep)
                    incomplete.pop(ep, None)
                else:  # an early hint: wait for more rows (or the last word, after the pipeline)
                    incomplete[ep] = outcome.missing
                    tracker.retry.remote(ep, outcome.missing)
            if self.progress is not None:
                self.progress.update(rows, good, committed, sum(self.results[ep].errors for ep in committed))
            if self.store is not None:
                self.store.maybe_flush()
            if (
                finished
                and not in_flight
                and (failure or all(ep in self.results or ep in final_tried for ep in self.episodes))
            ):
                break
            if not in_flight:
                thread.join(POLL_S)
        ray.kill(tracker)
        if failure:
            raise failure[0]
        lost = {ep: n for ep, n in incomplete.items() if ep not in self.results}
        if lost:
            ep, n = next(iter(sorted(lost.items())))
            raise IncompleteEpisode(
                f"{len(lost)} episode(s) not committed: rows are not staged (e.g. episode {ep}: {n} of "
                f"the episode's rows missing); re-run the job to finish them"
            )
        return self.results

    def _committed(self, outcome: CommitOutcome) -> None:
        self.results[outcome.episode] = outcome.result
        if self.store is not None and outcome.store_fragments is not None:
            self.store.add(outcome.episode, outcome.store_fragments)
