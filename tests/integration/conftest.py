"""Integration tier: real Ray and the real vLLM CPU engine on the project's tiny checkpoint."""

import os

import pytest

# The engine runs inside the test process (or the actor's): no engine-core subprocess, and the SigLIP
# shrinking hook can patch the model class before it is built.
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")


def pytest_collection_modifyitems(items):
    for item in items:
        if "/integration/" in str(item.fspath):
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="module")
def local_ray():
    """A local Ray for one test module; shut down after it so that no cluster outlives its module
    (test_jobs_run.py starts clusters of its own)."""
    import ray

    ray.init(include_dashboard=False, log_to_driver=False, num_cpus=2)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module", params=["vllm", "transformers"])
def backend(request) -> tuple[str, dict]:
    """Each engine backend on its tiny checkpoint: ``(model path, config sections for make_config)``. A
    module whose tests take it runs them once per backend (vLLM with the SigLIP tower shrunk; the
    transformers checkpoint's own towers are tiny)."""
    if request.param == "vllm":
        return request.getfixturevalue("tiny_model"), {
            "engine": {"init_hook": "jobs.tiny_vision:shrink_siglip"}
        }
    model = request.getfixturevalue("tiny_transformers_model")
    return model, {"engine": {"backend": "transformers"}, "model": {"load_format": "auto"}}
