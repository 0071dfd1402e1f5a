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


@pytest.fixture(scope="session")
def local_ray():
    import ray

    ray.init(include_dashboard=False, log_to_driver=False, num_cpus=2)
    yield ray
    ray.shutdown()
