"""Which rows were in the engine when it died: the memory that lets a crashing row be isolated, then
quarantined, instead of killing every restarted actor that retries its batch.

A row's *unfinished attempts* count the times it was handed to an engine without coming back. The GPU
stage runs a row with one unfinished attempt alone (so a second crash names the culprit) and turns a
row with two into an ENGINE_CRASH_QUARANTINED error row. The ledger must outlive the actor that
crashed: in a pipeline it is a Ray actor (``pipelines.ledger``); this in-process one serves tests.
"""

from __future__ import annotations

import threading
from collections import Counter
from typing import Protocol

QUARANTINE_AFTER = 2


class AttemptLedger(Protocol):
    def attempts(self, ids: list[str]) -> list[int]:
        """Each row's unfinished attempts so far."""

    def start(self, ids: list[str]) -> None:
        """Record that these rows enter the engine."""

    def finish(self, ids: list[str]) -> None:
        """Record that these rows came back from the engine (with a result or a per-row error)."""

    def report(self, stage: str, actor: str, stats: dict) -> None:
        """Latest statistics of one actor of a stage ('preprocess' or 'generate')."""


class LocalAttemptLedger:
    def __init__(self):
        self._unfinished: Counter = Counter()
        self._stats: dict[str, dict[str, dict]] = {}
        self._lock = threading.Lock()

    def attempts(self, ids: list[str]) -> list[int]:
        with self._lock:
            return [self._unfinished[i] for i in ids]

    def start(self, ids: list[str]) -> None:
        with self._lock:
            self._unfinished.update(ids)

    def finish(self, ids: list[str]) -> None:
        with self._lock:
            for i in ids:
                self._unfinished.pop(i, None)

    def report(self, stage: str, actor: str, stats: dict) -> None:
        with self._lock:
            self._stats.setdefault(stage, {})[actor] = stats

    def actor_stats(self) -> dict[str, dict[str, dict]]:
        """{stage: {actor: its latest statistics}}."""
        with self._lock:
            return {stage: dict(actors) for stage, actors in self._stats.items()}
