"""How a stage is scheduled, kept apart from what it does (the callable class in ``actors``)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from schemas.job import StageResources, pool_bounds


class StageSpec(BaseModel):
    """One ``map_batches`` step: a callable class run by a pool of actors, scheduled as configured."""

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)

    fn: type = Field(
        description="Callable class: __init__(**fn_constructor_kwargs), __call__(pa.Table) -> pa.Table."
    )
    fn_constructor_kwargs: dict[str, Any] = Field(default_factory=dict, description="Constructor arguments.")
    resources: StageResources = Field(
        default_factory=StageResources,
        description="The stage's pool as the job configures it (resources.preprocess / resources.generate).",
    )
    env: dict[str, str] = Field(
        default_factory=dict, description="Environment variables of the stage's actors."
    )


def apply(ds, stages: list[StageSpec]):
    """Chain the stages onto a Ray dataset with the public ``map_batches``; nothing else."""
    from ray.data import ActorPoolStrategy

    for stage in stages:
        res = stage.resources
        low, high = pool_bounds(res.concurrency)
        compute = ActorPoolStrategy(
            min_size=low,
            max_size=high,
            max_concurrent_calls_per_actor=res.concurrent_batches,
            enable_true_multi_threading=res.concurrent_batches > 1,
        )
        ds = ds.map_batches(
            stage.fn,
            fn_constructor_kwargs=stage.fn_constructor_kwargs,
            batch_size=res.batch_size,
            batch_format="pyarrow",
            compute=compute,
            num_cpus=res.num_cpus,
            num_gpus=res.num_gpus or None,
            udf_modifying_row_count=False,
            runtime_env={"env_vars": dict(stage.env)} if stage.env else None,
            # Bounded, unlike Ray Data's default (-1): an actor that can never start must end the job.
            # Ray 2.60 deprecates passing it this way (and ray_remote_args_fn) without a named successor yet.
            max_restarts=res.max_restarts,
        )
    return ds


def on_driver_node():
    """Ray's scheduling strategy that keeps an actor on the driver's node: the run's own actors (the attempt
    ledger, the writers) ask for no CPU, so Ray may put them on any node, and a GPU node the cluster loses
    would take them with it. The driver's node is the one whose loss ends the job anyway."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    return NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
