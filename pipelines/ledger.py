"""The attempt ledger of a run as a Ray actor, so it survives the GPU actors that crash.

Each attempt's holder is the GPU actor's Ray worker and node (``(worker_id, node_id)``, hex). Whose a
holder's death was comes from what Ray's control store (GCS) recorded (``death_of``, ``host_death``):

- its node is dead (lost, preempted, drained): the cluster's. A lost node's workers keep their "alive"
  record; the node's is the one that tells.
- its worker exited as NODE_OUT_OF_MEMORY (Ray's memory monitor killed it) or INTENDED_SYSTEM_EXIT
  (Ray ended it on purpose: ``ray.kill``, a node being drained): the cluster's.
- any other exit (SYSTEM_ERROR: the process exited by itself, as the engine-death path's ``os._exit(70)``
  does, or died of a signal; USER_ERROR; INTENDED_USER_EXIT): suspect. A kernel OOM kill is a SIGKILL
  Ray cannot tell from any other (its exit detail only guesses), so it stays suspect.
- a worker still recorded alive on a live node: not known dead (None).
"""

from __future__ import annotations

import logging

import ray

from actors.attempts import CLUSTER, SUSPECT, LocalAttemptLedger
from pipelines.spec import on_driver_node

# WorkerExitType names (ray.core.generated.common_pb2) of exits the cluster caused
logger = logging.getLogger(__name__)

CLUSTER_EXITS = frozenset({"NODE_OUT_OF_MEMORY", "INTENDED_SYSTEM_EXIT"})


def host_death(worker, node: dict | None) -> str | None:
    """CLUSTER, SUSPECT or None (not known dead) for a holder, from its worker's GCS record (a
    ``gcs_pb2.WorkerTableData``, None when there is none) and its node's (a ``ray.nodes()`` entry)."""
    from ray.core.generated.common_pb2 import WorkerExitType

    if node is not None and not node["Alive"]:
        return CLUSTER
    if worker is None or worker.is_alive:
        return None
    return CLUSTER if WorkerExitType.Name(worker.exit_type) in CLUSTER_EXITS else SUSPECT


def death_of(holder: tuple[str, str]) -> str | None:
    """``host_death`` of a holder, read from the GCS (no public API gives a worker's exit type without
    the dashboard, so Ray's own state accessor)."""
    from ray._private.state import state
    from ray.core.generated.gcs_pb2 import WorkerTableData

    worker_id, node_id = holder
    raw = state._connect_and_get_accessor().get_worker_info(ray.WorkerID(bytes.fromhex(worker_id)))
    worker = WorkerTableData.FromString(raw) if raw else None
    node = next((n for n in ray.nodes() if n["NodeID"] == node_id), None)
    verdict = host_death(worker, node)
    if verdict is not None:
        logger.warning(
            "a GPU actor died with rows in its engine (worker %s, node %s): %s", worker_id[:8], node_id[:8],
            "the cluster's, not held against them" if verdict == CLUSTER else "suspect, held against them",
        )  # fmt: skip
    return verdict


@ray.remote(num_cpus=0, max_restarts=-1)
class _LedgerActor(LocalAttemptLedger):
    def __init__(self):
        super().__init__(death_of)


class RayAttemptLedger:
    """Picklable client: actors get this object and reach the run's ledger actor by name."""

    def __init__(self, run_id: str):
        self.name = f"phi4mm-batch-attempts-{run_id}"
        self._handle = None

    def create(self) -> RayAttemptLedger:
        self._handle = _LedgerActor.options(
            name=self.name, get_if_exists=True, scheduling_strategy=on_driver_node()
        ).remote()
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
        context = ray.get_runtime_context()  # this process: whose death would leave the rows unfinished
        ray.get(self.handle.start.remote(ids, (context.get_worker_id(), context.get_node_id())))

    def finish(self, ids: list[str]) -> None:
        ray.get(self.handle.finish.remote(ids))

    def report(self, stage: str, actor: str, stats: dict) -> None:
        self.handle.report.remote(stage, actor, stats)

    def actor_stats(self) -> dict[str, dict[str, dict]]:
        return ray.get(self.handle.actor_stats.remote())

    def engine_deaths(self) -> dict[str, int]:
        return ray.get(self.handle.engine_deaths.remote())

    def close(self) -> None:
        ray.kill(self.handle)
