"""A run's rows, errors, tokens and engine state as Ray metrics (actors.run_metrics), read back the way
Prometheus reads them: from the node's metrics port, after a real run through Ray and the vLLM CPU engine."""

import os
import re
import socket
import time
import urllib.request

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs.make_sample_data import SCHEMA, sample_rows
from pipelines.phi4mm import run_pipeline
from tests.helpers import MEDIA, make_config


@pytest.fixture(scope="module")
def metrics_ray():
    import ray

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ["RAY_metrics_report_interval_ms"] = "500"  # read by the processes Ray starts next
    ray.init(include_dashboard=False, log_to_driver=False, num_cpus=2, _metrics_export_port=port)
    yield port
    ray.shutdown()
    del os.environ["RAY_metrics_report_interval_ms"]


def _scrape(port: int) -> dict[tuple[str, frozenset], float]:
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    out = {}
    for line in body.splitlines():
        if m := re.match(r"(ray_phi4mm_\w+)\{(.*)\} (\S+)$", line):
            tags = frozenset(re.findall(r'(run_id|status|error_code|kind|actor)="([^"]*)"', m.group(2)))
            out[(m.group(1), tags)] = out.get((m.group(1), tags), 0.0) + float(m.group(3))
    return out


def _total(metrics: dict, name: str, **tags) -> float:
    want = set(tags.items())
    return sum(v for (n, t), v in metrics.items() if n == name and want <= t)


def test_rows_errors_tokens_and_engine_state_reach_the_metrics_port(metrics_ray, tiny_model, tmp_path):
    rows = [r for r in sample_rows() if not r["image"]]  # text, audio and the broken empty row: fast
    data = tmp_path / "in.parquet"
    pq.write_table(pa.Table.from_pylist(rows, schema=SCHEMA), data)
    config = make_config(tiny_model, tmp_path, input={"path": str(data), "media_root": str(MEDIA)})
    summary = run_pipeline(config, run_id="metrics-run")
    errors = summary["status"].get("error", 0)
    assert summary["rows_written"] == len(rows) and errors == 1
    deadline = time.monotonic() + 120  # exported every 500 ms: wait until this run's rows all arrived
    while True:
        metrics = _scrape(metrics_ray)
        answered = _total(metrics, "ray_phi4mm_rows_total", run_id="metrics-run")
        if answered >= len(rows) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert answered == len(rows)
    assert _total(metrics, "ray_phi4mm_rows_total", run_id="metrics-run", status="ok") == len(rows) - errors
    assert _total(metrics, "ray_phi4mm_rows_total", status="error", error_code="MISSING_INPUT") == errors
    assert _total(metrics, "ray_phi4mm_tokens_total", kind="prompt") == summary["prompt_tokens"]
    assert _total(metrics, "ray_phi4mm_tokens_total", kind="completion") == summary["completion_tokens"]
    (engine,) = summary["engines"].values()
    assert _total(metrics, "ray_phi4mm_engine_kv_cache_tokens") == engine["work"]["kv_cache_tokens"] > 0
