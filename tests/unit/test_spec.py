"""How stages are scheduled: what ``pipelines.spec.apply`` hands Ray Data (no Ray cluster needed)."""

import pytest

from pipelines.spec import StageSpec, apply


class RecordingDataset:
    def __init__(self):
        self.calls = []

    def map_batches(self, fn, **kwargs):
        self.calls.append((fn, kwargs))
        return self


class Stage:
    def __call__(self, batch):
        return batch


def test_apply_maps_resources_onto_map_batches_and_bounds_restarts():
    ds = RecordingDataset()
    specs = [
        StageSpec(fn=Stage, concurrency=(1, 4), batch_size=32, num_cpus=0.5, max_restarts=3),
        StageSpec(fn=Stage, concurrency=2, num_gpus=1, concurrent_batches=4, max_restarts=0, env={"A": "1"}),
    ]
    apply(ds, specs)
    (_, pre), (_, gen) = ds.calls
    assert (pre["max_restarts"], gen["max_restarts"]) == (3, 0)  # never Ray Data's unbounded default
    assert (pre["compute"].min_size, pre["compute"].max_size) == (1, 4)
    assert (gen["compute"].min_size, gen["compute"].max_size) == (2, 2)
    assert gen["compute"].max_concurrent_calls_per_actor == 4
    assert pre["compute"].max_concurrent_calls_per_actor == 1
    assert gen["num_gpus"] == 1 and pre["num_gpus"] is None
    assert gen["runtime_env"] == {"env_vars": {"A": "1"}} and pre["runtime_env"] is None
    assert pre["batch_size"] == 32 and pre["batch_format"] == "pyarrow"


@pytest.mark.parametrize("concurrency", [0, (0, 2), (3, 1)])
def test_bad_pool_sizes_are_refused(concurrency):
    from schemas.job import StageResources

    with pytest.raises(ValueError, match="min <= max"):
        StageResources(concurrency=concurrency)
