"""Deaths the cluster owns are not held against the rows in the engine: on a Ray cluster of a head node
and one "GPU" node at a time (the vLLM CPU engine; the GPU is a Ray resource that pins the GPU actor
there), the node under the GPU actor is lost three times while the same row is in its engine. The row
is answered, not quarantined, and the summary counts the deaths as the cluster's.

Ray's memory monitor is the other death the cluster owns; its kills depend on the host's memory, which
other processes share, so its record (NODE_OUT_OF_MEMORY) is checked in tests/unit/test_ledger.py."""

import threading
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.phi4mm import run_pipeline
from tests.helpers import REPO, make_config

GPU_NODE = {"num_cpus": 1, "num_gpus": 1}


@pytest.fixture(scope="module")
def cluster():
    import ray
    from ray.cluster_utils import Cluster

    # a lost node is declared dead after 3 missed health checks of 0.5 s (Ray's default: 5 of 3 s)
    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 2,
            "include_dashboard": False,
            "_system_config": {"health_check_period_ms": 500, "health_check_failure_threshold": 3},
        },
    )
    ray.init(address=cluster.address, log_to_driver=False)
    yield cluster
    ray.shutdown()
    cluster.shutdown()


def test_a_row_in_flight_when_nodes_are_lost_is_not_quarantined(cluster, tiny_model, tmp_path):
    rows = [{"id": f"r{i}", "prompt": "hello world"} for i in range(4)]
    rows[2]["prompt"] = "hello STALL"
    data = tmp_path / "in.parquet"
    pq.write_table(
        pa.Table.from_pylist(rows, schema=pa.schema([("id", pa.string()), ("prompt", pa.string())])), data
    )
    faults = tmp_path / "faults"
    faults.mkdir()
    config = make_config(
        tiny_model,
        tmp_path,
        input={"path": str(data)},
        engine={"init_hook": "tests.integration.faults:stall_on_marker",
                "env": {"VLLM_CPU_KVCACHE_SPACE": "1", "PYTHONPATH": str(REPO), "FAULTS_DIR": str(faults)}},
        sampling={"max_tokens": 4},
        # one batch, one at a time: the only block the GPU node ever holds is the one it is working on
        resources={"generate": {"concurrency": 1, "batch_size": 8, "num_cpus": 1, "num_gpus": 1,
                                "concurrent_batches": 1},
                   "preprocess": {"concurrency": 1, "batch_size": 8, "num_cpus": 0.25}, "io_num_cpus": 0.25},
    )  # fmt: skip
    # a "GPU" node for each life of the GPU actor, added here (Ray adds nodes from the main thread only)
    gpu_nodes = {node.node_id: node for node in (cluster.add_node(**GPU_NODE) for _ in range(4))}
    lost, done = [], threading.Event()

    def lose_the_node_under_the_row():
        try:
            while not done.is_set() and len(lost) < 3:
                stalled = [p.name.split("-")[1] for p in faults.glob("stalled-*")]
                for node_id in set(stalled) - set(lost):  # the row is in an engine: that engine's node goes
                    cluster.remove_node(gpu_nodes[node_id], allow_graceful=False)
                    lost.append(node_id)
                time.sleep(0.1)
        finally:  # the row may finish now (and the run with it, whatever happened here)
            (faults / "release").touch()

    killer = threading.Thread(target=lose_the_node_under_the_row, daemon=True)
    killer.start()
    try:
        summary = run_pipeline(config, run_id="lost")
    finally:
        done.set()
        killer.join(timeout=10)
    out = {r["id"]: r for r in pq.read_table(config.output.path).to_pylist()}
    assert sorted(out) == [r["id"] for r in rows]
    assert out["r2"]["status"] == "ok", out["r2"]["error_message"]  # before: ENGINE_CRASH_QUARANTINED
    assert len(lost) == 3, f"the row's node was lost {len(lost)} times, not 3"
    assert summary["audit"]["ok"] and summary["status"] == {"ok": 4}
    # Each death is judged when the row comes back. One run in three here judged one death as not known
    # yet (then it counts neither way, and against the row once, as before): hence at least 2, not 3.
    assert summary["engine_deaths"]["suspect"] == 0 and summary["engine_deaths"]["cluster"] >= 2
