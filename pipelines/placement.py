"""Can the cluster place one actor of every stage? Asked once Ray is up and before any data is read.

Ray Data waits, without an error, for resources no node has: a GPU stage on a cluster without GPUs logged
``No available node types can fulfill resource request {'GPU': 1.0, 'CPU': 1.0}`` and ``progress: 0/4
rows`` every half minute until it was killed. A stage whose one actor fits no node of the cluster, and no
node type its autoscaler may add, is a job error instead (exit 2), naming the stage and the resource.

``unplaceable`` is the rule on plain dicts (a unit test calls it); ``check_placement`` reads the live
cluster: its alive nodes' totals and, where an autoscaler published its node types (KubeRay, the cluster
launcher), those with room for at least one more node.
"""

from __future__ import annotations

from schemas.errors import JobError
from schemas.job import JobConfig


def actor_requests(config: JobConfig) -> dict[str, dict[str, float]]:
    """Each actor pool's resources per actor, as Ray asks for them (zero amounts left out)."""
    res = config.resources
    return {
        f"resources.{name}": {k: v for k, v in (("CPU", stage.num_cpus), ("GPU", stage.num_gpus)) if v > 0}
        for name, stage in (("preprocess", res.preprocess), ("generate", res.generate))
    }


def unplaceable(requests: dict[str, dict[str, float]], shapes: list[dict[str, float]]) -> list[str]:
    """One sentence per stage whose request fits none of ``shapes`` (a node's or node type's resources)."""
    problems = []
    for stage, request in requests.items():
        if any(all(shape.get(k, 0) >= v for k, v in request.items()) for shape in shapes):
            continue
        short = [k for k, v in request.items() if not any(shape.get(k, 0) >= v for shape in shapes)]
        missing = short or list(request)  # each fits somewhere alone, but no node has all of them
        largest = ", ".join(f"{k} {max((s.get(k, 0) for s in shapes), default=0):g}" for k in missing)
        asked = ", ".join(f"{k} {v:g}" for k, v in request.items())
        problems.append(
            f"{stage} asks for {asked} per actor, but no node can give it (largest node: {largest})"
        )
    return problems


def cluster_shapes() -> tuple[list[dict[str, float]], bool]:
    """The alive nodes' total resources plus the autoscaler's node types that may still add a node, and
    whether node types were found at all."""
    import ray

    shapes = [dict(n["Resources"]) for n in ray.nodes() if n.get("Alive")]
    try:
        from ray._private.state import state

        # Ray Data reads the autoscaler's node types the same way (data/_internal/cluster_autoscaler)
        config = state.get_cluster_config()
    except Exception:  # a Ray without this record: judge by the nodes alone
        config = None
    groups = list(config.node_group_configs) if config is not None else []
    shapes += [dict(g.resources) for g in groups if g.max_count != 0]
    return shapes, bool(groups)


def check_placement(config: JobConfig) -> None:
    """Raise ``JobError`` when some stage's one actor fits no node and no node type of the cluster."""
    shapes, autoscaled = cluster_shapes()
    problems = unplaceable(actor_requests(config), shapes)
    if problems:
        where = (
            "no node type of its autoscaler either" if autoscaled else "and it has no autoscaler node types"
        )
        raise JobError(
            f"this cluster cannot run the job: {'; '.join(problems)} ({where}). Try a cluster with such "
            "nodes, or smaller resources.*.num_gpus / num_cpus (on a machine without a GPU: "
            "--config jobs/configs/profiles/cpu.yaml after your config, with the tiny checkpoint)."
        )
