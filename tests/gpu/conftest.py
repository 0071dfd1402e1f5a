"""GPU tier: the engine contract and a pipeline run on CUDA. Skipped without a CUDA device (CI has none;
the CPU suite stays the gate). Run on a GPU machine with ``python -m pytest tests/gpu``."""

import os

import pytest

os.environ.setdefault("VLLM_USE_FLASHINFER_SAMPLER", "0")  # its JIT build takes minutes; greedy needs none
# The engine core in the test's own process, as in a GPU actor: a forked engine-core process could not
# use the CUDA context this process has already made.
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")


def _cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def pytest_collection_modifyitems(config, items):
    cuda = _cuda()
    skip = pytest.mark.skip(reason="no CUDA device: the GPU tier runs on a GPU machine")
    for item in items:
        if "/gpu/" in str(item.fspath):
            item.add_marker(pytest.mark.gpu)
            if not cuda:
                item.add_marker(skip)


@pytest.fixture(scope="module")
def cuda_ray():
    import ray

    ray.init(include_dashboard=False, log_to_driver=False, num_cpus=4, num_gpus=1)
    yield ray
    ray.shutdown()
