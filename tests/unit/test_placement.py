"""A stage whose one actor fits no node of the cluster is a job error before any data is read
(pipelines.placement), instead of a run that waits forever."""

import pytest

from pipelines.placement import actor_requests, unplaceable
from tests.helpers import make_config

GPU_NODE = {"CPU": 16.0, "GPU": 1.0, "memory": 1e11}
CPU_NODE = {"CPU": 2.0, "memory": 2e10}


def test_each_pool_asks_for_its_cpus_and_gpus(tmp_path):
    config = make_config("model", tmp_path, resources={
        "preprocess": {"num_cpus": 1}, "generate": {"num_cpus": 2, "num_gpus": 1}})  # fmt: skip
    assert actor_requests(config) == {
        "resources.preprocess": {"CPU": 1.0},
        "resources.generate": {"CPU": 2.0, "GPU": 1.0},
    }


def test_a_gpu_stage_on_cpu_nodes_is_named_with_the_resource_it_lacks():
    requests = {"resources.preprocess": {"CPU": 1.0}, "resources.generate": {"CPU": 1.0, "GPU": 1.0}}
    (problem,) = unplaceable(requests, [CPU_NODE, CPU_NODE])
    assert problem == (
        "resources.generate asks for CPU 1, GPU 1 per actor, but no node can give it (largest node: GPU 0)"
    )
    assert unplaceable(requests, [CPU_NODE, GPU_NODE]) == []  # one GPU node (or node type) is enough


@pytest.mark.parametrize(
    "request_, shapes, short",
    [
        ({"CPU": 32.0}, [GPU_NODE, CPU_NODE], "CPU 16"),  # more CPUs than any node has
        (
            {"CPU": 4.0, "GPU": 1.0},
            [{"CPU": 2.0, "GPU": 1.0}, {"CPU": 8.0}],
            "CPU 8, GPU 1",
        ),  # not on one node
        ({"GPU": 0.5}, [], "GPU 0"),  # no node at all
    ],
)
def test_a_request_must_fit_one_node_whole(request_, shapes, short):
    (problem,) = unplaceable({"resources.generate": request_}, shapes)
    assert problem.endswith(f"(largest node: {short})")
