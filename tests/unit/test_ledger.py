"""Whose an engine death was, from the records Ray's control store keeps of the dead process and its
node (``pipelines.ledger.host_death``), built here as Ray builds them: a ``WorkerTableData`` proto and a
``ray.nodes()`` entry. tests/integration/test_host_failure.py reads them from a live cluster."""

import pytest
from ray.core.generated.common_pb2 import NodeDeathInfo, WorkerExitType
from ray.core.generated.gcs_pb2 import WorkerTableData

from pipelines.ledger import host_death

MEMORY_MONITOR = (  # the exit detail Ray 2.60's memory monitor records (abridged)
    "1 worker(s) were killed due to the node running low on memory. Memory on the node (IP: 10.0.0.2) "
    "was 4.73GB used / 23.54GB limit (0.201060)"
)
UNEXPECTED = (  # what Ray records for os._exit, a segfault or a SIGKILL (abridged)
    "Worker unexpectedly exits with a connection error code 2. End of file. Some common causes include: (1) "
    "the process was killed by the OOM killer due to high memory usage, ..."
)


def _worker(exit_type: str | None, detail: str = "") -> WorkerTableData:
    if exit_type is None:
        return WorkerTableData(is_alive=True)
    return WorkerTableData(is_alive=False, exit_type=WorkerExitType.Value(exit_type), exit_detail=detail)


def _node(reason: str | None, message: str = "") -> dict:
    if reason is None:
        return {"NodeID": "n", "Alive": True, "DeathReason": 0, "DeathReasonMessage": ""}
    return {"NodeID": "n", "Alive": False, "DeathReason": NodeDeathInfo.Reason.Value(reason),
            "DeathReasonMessage": message}  # fmt: skip


@pytest.mark.parametrize(
    ("worker", "node", "verdict"),
    [
        (_worker("NODE_OUT_OF_MEMORY", MEMORY_MONITOR), _node(None), "cluster"),
        (_worker("INTENDED_SYSTEM_EXIT", "killed by `ray.kill`"), _node(None), "cluster"),
        # a lost node's workers keep their "alive" record: the node's record tells
        (_worker(None), _node("UNEXPECTED_TERMINATION", "health check failed"), "cluster"),
        (_worker(None), _node("AUTOSCALER_DRAIN_PREEMPTED", "preempted"), "cluster"),
        (None, _node("EXPECTED_TERMINATION"), "cluster"),
        # the process ended by itself: os._exit(70) on a dead engine, a segfault, a kernel OOM kill
        (_worker("SYSTEM_ERROR", UNEXPECTED), _node(None), "suspect"),
        (_worker("USER_ERROR"), _node(None), "suspect"),
        (_worker("INTENDED_USER_EXIT"), _node(None), "suspect"),
        # not known dead: still counted against its rows, as before
        (_worker(None), _node(None), None),
        (None, _node(None), None),
        (None, None, None),
    ],
)
def test_whose_death_it_was(worker, node, verdict):
    assert host_death(worker, node) == verdict


def test_the_summary_prints_engine_deaths_apart():
    from jobs.run import format_summary

    summary = {
        "run_id": "r", "model": "m", "input": "in", "output": "out", "rows_written": 2, "status": {"ok": 2},
        "rows_skipped_already_done": 0, "error_codes": {}, "prompt_tokens": 0, "completion_tokens": 0,
        "wall_s": 2.0, "rows_per_s": 1.0, "engine_deaths": {"cluster": 3, "suspect": 1},
        "audit": {"ok": True, "input_rows": 2, "output_rows": 2, "missing_ids": 0, "duplicate_ids": 0},
    }  # fmt: skip
    assert "engine deaths    3 the cluster's (out of memory, node lost or preempted" in format_summary(
        summary
    )
    summary["engine_deaths"] = {"cluster": 0, "suspect": 0}
    assert "engine deaths" not in format_summary(summary)
