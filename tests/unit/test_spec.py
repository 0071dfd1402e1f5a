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
    from schemas.job import StageResources

    pre_res = StageResources(concurrency=(1, 4), batch_size=32, num_cpus=0.5, max_restarts=3)
    gen_res = StageResources(concurrency=2, num_gpus=1, concurrent_batches=4, max_restarts=0)
    specs = [StageSpec(fn=Stage, resources=pre_res), StageSpec(fn=Stage, resources=gen_res, env={"A": "1"})]
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


def test_gpu_actors_get_the_compile_cache_and_the_engine_env(tmp_path):
    from pipelines.phi4mm import build_stages
    from tests.helpers import make_config

    config = make_config(
        "/models/x", tmp_path, engine={"compile_cache_dir": "/shared/cache", "env": {"X": "1"}}
    )
    pre, gen = build_stages(config, run_id="r")
    assert (pre.resources, gen.resources) == (config.resources.preprocess, config.resources.generate)
    assert gen.env["VLLM_CACHE_ROOT"] == "/shared/cache/vllm"
    assert gen.env["TRITON_CACHE_DIR"] == "/shared/cache/triton"
    assert gen.env["TORCHINDUCTOR_CACHE_DIR"] == "/shared/cache/inductor"
    assert gen.env["X"] == "1" and gen.env["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"  # executor uni
    assert pre.env == {}
    without = build_stages(make_config("/models/x", tmp_path), run_id="r")[1]
    assert not any(k.endswith("CACHE_DIR") or k == "VLLM_CACHE_ROOT" for k in without.env)


def test_a_relative_compile_cache_dir_resolves_against_the_yaml(tmp_path):
    from schemas.job import JobConfig

    (tmp_path / "job.yaml").write_text(
        "input: {path: in.parquet}\noutput: {path: out}\nmodel: {path: m}\nengine: {compile_cache_dir: cache}\n"
    )
    assert JobConfig.from_yaml(tmp_path / "job.yaml").engine.compile_cache_dir == str(tmp_path / "cache")
