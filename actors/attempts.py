"""Which rows were in the engine when it died: the memory that lets a crashing row be isolated, then
quarantined, instead of killing every restarted actor that retries its batch.

A row's *unfinished attempts* count the times it was handed to an engine without coming back. The GPU
stage runs a row with one unfinished attempt alone (so a second crash names the culprit) and turns a
row with two into an ENGINE_CRASH_QUARANTINED error row. The ledger must outlive the actor that
crashed: in a pipeline it is a Ray actor (``pipelines.ledger``); this in-process one serves tests.

Each attempt remembers its *holder* (the process that took the row into its engine). Once the holder is
dead, ``death_of`` says whose death it was: ``CLUSTER`` when the cluster reports it as its own (an
out-of-memory kill by Ray's memory monitor, a lost or preempted node), and the attempt is forgiven, so
the row is retried as if new, however often that happens; ``SUSPECT`` otherwise (the process exited by
itself, a segfault, a SIGKILL nobody owns up to), and the attempt counts against the row. A holder not
known to be dead yet counts too, as before.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable, Hashable
from typing import Protocol

QUARANTINE_AFTER = 2
CLUSTER, SUSPECT = "cluster", "suspect"  # whose an engine death was (``LocalAttemptLedger.engine_deaths``)


class AttemptLedger(Protocol):
    def attempts(self, ids: list[str]) -> list[int]:
        """Each row's unfinished attempts so far, less those whose holder the cluster killed."""

    def start(self, ids: list[str]) -> None:
        """Record that these rows enter the engine."""

    def finish(self, ids: list[str]) -> None:
        """Record that these rows came back from the engine (with a result or a per-row error)."""

    def report(self, stage: str, actor: str, stats: dict) -> None:
        """Latest statistics of one actor of a stage ('preprocess' or 'generate')."""


class LocalAttemptLedger:
    """``death_of(holder)``: CLUSTER or SUSPECT once the holder is dead, None while it is not known to
    be (the default: nothing is forgiven)."""

    def __init__(self, death_of: Callable[[Hashable], str | None] = lambda holder: None):
        self._death_of = death_of
        self._unfinished: dict[str, list[Hashable]] = {}  # row id -> the holder of each unfinished attempt
        self._verdicts: dict[Hashable, str] = {}  # dead holders, whose death each was
        # holders of attempts that ended without their rows (a row came back and finished elsewhere) whose
        # death was not known yet when it came back: judged again when the deaths are counted
        self._gone: set[Hashable] = set()
        self._stats: dict[str, dict[str, dict]] = {}
        self._lock = threading.Lock()

    def attempts(self, ids: list[str]) -> list[int]:
        with self._lock:
            counts = []
            for i in ids:
                held = [h for h in self._unfinished.get(i, []) if self._verdict(h) != CLUSTER]
                if held:
                    self._unfinished[i] = held
                else:
                    self._unfinished.pop(i, None)
                counts.append(len(held))
            return counts

    def start(self, ids: list[str], holder: Hashable = None) -> None:
        with self._lock:
            for i in ids:
                self._unfinished.setdefault(i, []).append(holder)

    def finish(self, ids: list[str]) -> None:
        with self._lock:
            for i in ids:
                earlier = self._unfinished.pop(i, [])[:-1]  # the last attempt is the one finishing now
                self._gone.update(h for h in earlier if h is not None and h not in self._verdicts)

    def engine_deaths(self) -> dict[str, int]:
        """Engine deaths with rows in them, by whose they were: ``{"cluster": N, "suspect": M}``."""
        with self._lock:
            for h in [h for holders in self._unfinished.values() for h in holders] + list(self._gone):
                self._verdict(h)
            counts = Counter(self._verdicts.values())
            return {CLUSTER: counts[CLUSTER], SUSPECT: counts[SUSPECT]}

    def _verdict(self, holder: Hashable) -> str | None:
        if holder is None:
            return None
        if holder not in self._verdicts and (verdict := self._death_of(holder)) is not None:
            self._verdicts[holder] = verdict
        return self._verdicts.get(holder)

    def report(self, stage: str, actor: str, stats: dict) -> None:
        with self._lock:
            self._stats.setdefault(stage, {})[actor] = stats

    def actor_stats(self) -> dict[str, dict[str, dict]]:
        """{stage: {actor: its latest statistics}}."""
        with self._lock:
            return {stage: dict(actors) for stage, actors in self._stats.items()}
