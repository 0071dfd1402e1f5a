"""GPU actors that die mid-run, on a local Ray with the real vLLM CPU engine: every input row still
yields exactly one output row, with no duplicates; a row that kills the engine twice is quarantined."""

import os
import signal
import threading
import time

import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.phi4mm import run_pipeline
from tests.helpers import REPO, make_config

SCHEMA = pa.schema([("id", pa.string()), ("prompt", pa.string())])


def _config(tiny_model, tmp_path, rows, hook):
    data = tmp_path / "in.parquet"
    pq.write_table(pa.Table.from_pylist(rows, schema=SCHEMA), data)
    return make_config(
        tiny_model,
        tmp_path,
        input={"path": str(data)},
        output={"path": str(tmp_path / "out"), "rows_per_file": 4, "commit_every_s": 3600},
        engine={"init_hook": hook, "env": {"VLLM_CPU_KVCACHE_SPACE": "1", "PYTHONPATH": str(REPO)}},
        sampling={"max_tokens": 96, "ignore_eos": True},
        resources={"generate": {"concurrency": 1, "batch_size": 4, "num_cpus": 0.5, "concurrent_batches": 2},
                   "preprocess": {"concurrency": 1, "batch_size": 4, "num_cpus": 0.25}, "io_num_cpus": 0.25},
    )  # fmt: skip


def test_a_gpu_actor_killed_mid_run_loses_and_duplicates_nothing(local_ray, tiny_model, tmp_path):
    rows = [{"id": f"r{i:03d}", "prompt": f"tell me about the world {i}"} for i in range(64)]
    config = _config(tiny_model, tmp_path, rows, "jobs.tiny_vision:shrink_siglip")
    killed = []

    def kill_mid_run():
        # Wait until a GPU actor has finished a batch (it reports to the run's ledger), then kill it.
        import ray

        deadline = time.time() + 300
        while time.time() < deadline:
            try:
                stats = ray.get(ray.get_actor("phi4mm-batch-attempts-killed").actor_stats.remote()).get(
                    "generate", {}
                )
            except ValueError:  # the ledger does not exist yet
                stats = {}
            served = [actor for actor, s in stats.items() if s.get("requests")]  # not one still starting
            if served:
                pid = int(served[0].rsplit(":", 1)[1])
                os.kill(pid, signal.SIGKILL)  # as an OOM kill or a segfault would
                killed.append(pid)
                return
            time.sleep(0.1)

    killer = threading.Thread(target=kill_mid_run, daemon=True)
    killer.start()
    summary = run_pipeline(config, run_id="killed")
    killer.join(timeout=5)
    assert killed, "the GPU actor was never killed: the run finished before any output was committed"
    ids = pq.read_table(config.output.path).column("id").to_pylist()
    assert sorted(ids) == [r["id"] for r in rows]  # each exactly once
    assert summary["audit"]["ok"] and summary["status"] == {"ok": 64}
    assert (
        summary["engine_deaths"]["cluster"] == 0
    )  # a SIGKILL nobody owns up to: suspect, if rows were in it
    # parts of 4 rows (rows_per_file): the batches the killed actor's replacement redid add none
    assert summary["parts"]["count"] == 16
    # both the killed actor and its replacement served batches: the kill landed mid-run
    assert len(summary["engines"]) == 2


def test_a_row_that_kills_the_engine_twice_is_quarantined(local_ray, tiny_model, tmp_path):
    rows = [{"id": f"r{i}", "prompt": "hello world"} for i in range(6)]
    rows[3]["prompt"] = "hello POISON"
    config = _config(tiny_model, tmp_path, rows, "tests.integration.faults:poison_kills_engine")
    config = config.model_copy(update={"sampling": config.sampling.model_copy(update={"max_tokens": 4})})
    summary = run_pipeline(config, run_id="poison")
    out = {r["id"]: r for r in pq.read_table(config.output.path).to_pylist()}
    assert sorted(out) == [r["id"] for r in rows]
    assert out["r3"]["status"] == "error" and out["r3"]["error_code"] == "ENGINE_CRASH_QUARANTINED"
    assert all(out[k]["status"] == "ok" for k in out if k != "r3")
    assert summary["audit"]["ok"] and summary["error_codes"] == {"ENGINE_CRASH_QUARANTINED": 1}
    # the process exited by itself (os._exit): Ray owns neither death, both count against r3
    assert summary["engine_deaths"] == {"cluster": 0, "suspect": 2}
