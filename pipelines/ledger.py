"""The attempt ledger of a run as a Ray actor, so it survives the GPU actors that crash."""

from __future__ import annotations

import ray

from actors.attempts import LocalAttemptLedger


@ray.remote(num_cpus=0, max_restarts=-1)
class _LedgerActor(LocalAttemptLedger):
    pass


class RayAttemptLedger:
    """Picklable client: actors get this object and reach the run's ledger actor by name."""

    def __init__(self, run_id: str):
        self.name = f"phi4mm-batch-attempts-{run_id}"
        self._handle = None

    def create(self) -> RayAttemptLedger:
        self._handle = _LedgerActor.options(name=self.name, get_if_exists=True).remote()
        return self

    @property
    def handle(self):
        if self._handle is None:
            self._handle = ray.get_actor(self.name)
        return self._handle

    def __getstate__(self):
        return {"name": self.name, "_handle": None}

    def attempts(self, ids: list[str]) -> list[int]:
        return ray.get(self.handle.attempts.remote(ids))

    def start(self, ids: list[str]) -> None:
        ray.get(self.handle.start.remote(ids))

    def finish(self, ids: list[str]) -> None:
        ray.get(self.handle.finish.remote(ids))

    def report(self, stage: str, actor: str, stats: dict) -> None:
        self.handle.report.remote(stage, actor, stats)

    def actor_stats(self) -> dict[str, dict[str, dict]]:
        return ray.get(self.handle.actor_stats.remote())

    def close(self) -> None:
        ray.kill(self.handle)
