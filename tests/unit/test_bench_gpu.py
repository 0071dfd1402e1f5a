"""bench/gpu.py's side configs are valid job configs, so a typo in a variant fails here, not on the GPU."""

import pytest

from bench import gpu
from schemas.job import JobConfig


@pytest.mark.parametrize("profile", sorted(gpu.PROFILES))
@pytest.mark.parametrize("mode", [m for m in gpu.SIDES if m != "plain"])
def test_every_side_writes_a_valid_job_config(tmp_path, profile, mode):
    config = JobConfig.from_yaml(gpu.write_config(profile, mode, tmp_path / "d", tmp_path / "m", tmp_path))
    transformers = mode == "pipeline-transformers"
    assert config.engine.backend == ("transformers" if transformers else "vllm")
    assert config.model.path == str(tmp_path / ("m-transformers" if transformers else "m"))
    assert config.model.load_format == "dummy"  # both engines: random weights of the checkpoint's shapes
    assert config.model.use_lora is (mode != "pipeline-nolora")
    generate = config.resources.generate
    if mode == "pipeline-shared":
        assert (generate.concurrency, generate.num_gpus) == (2, 0.5)
    else:
        assert generate.concurrency == gpu.PROFILES[profile]["job"]["resources"]["generate"]["concurrency"]


def test_ratios_name_the_lora_cost_and_each_pipeline_against_the_others():
    sides = {
        "plain": {"rows_per_s": 2.0, "steady.rows_per_s": 4.0, "engine_up_after_s": 100.0},
        "pipeline": {"rows_per_s": 3.0, "steady.rows_per_s": 6.0, "engine_up_after_s": 50.0},
        "pipeline-nolora": {"rows_per_s": 4.0, "steady.rows_per_s": 8.0, "engine_up_after_s": 40.0},
    }
    out = gpu.ratios(sides)
    assert out["pipeline_lora_over_nolora.steady.rows_per_s"] == 0.75
    assert out["pipeline_over_plain.end_to_end"] == 1.5
    assert out["pipeline_over_plain.engine_up"] == 2.0
    assert not any(k.startswith("pipeline-nolora_over") for k in out)


def test_ratios_compare_transformers_with_vllm_in_the_pipeline():
    sides = {
        "pipeline": {"rows_per_s": 3.0, "steady.rows_per_s": 6.0, "steady.gen_tok_per_s": 600.0, "engine_up_after_s": 50.0},
        "pipeline-transformers": {"rows_per_s": 1.5, "steady.rows_per_s": 2.0, "steady.gen_tok_per_s": 200.0,
                                  "engine_up_after_s": 25.0},
    }  # fmt: skip
    out = gpu.ratios(sides)
    assert out["transformers_over_vllm.rows_per_s"] == 0.5
    assert out["transformers_over_vllm.steady.gen_tok_per_s"] == 0.333
    assert out["transformers_over_vllm.engine_up"] == 2.0  # started twice as fast


def test_every_cuda_side_compiles_into_a_cache_of_its_own_but_the_engine_reuses_the_pipelines(tmp_path):
    """So no side's start is flattered by graphs another side compiled on the same work directory."""
    caches = {
        mode: JobConfig.from_yaml(
            gpu.write_config("cuda", mode, tmp_path / "d", tmp_path / "m", tmp_path)
        ).engine.compile_cache_dir
        for mode in gpu.SIDES
    }
    assert caches["engine"] == caches["pipeline"]
    others = [c for mode, c in caches.items() if mode != "engine"]
    assert len(set(others)) == len(others)
