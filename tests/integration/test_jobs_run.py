"""`python -m jobs.run` as users run it: locally (as `make demo` does) and through `ray job submit`
against a running cluster. Both run vLLM's unmodified, full-size SigLIP tower (no init_hook), so an
image costs seconds here: the inputs stay few."""

import contextlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

import pyarrow.parquet as pq
import pytest

from jobs.make_sample_data import sample_rows, write_sample_dataset
from tests.helpers import REPO

DEMO = "jobs/configs/demo.yaml"
pytestmark = pytest.mark.full_tower


def _summary(stdout: str) -> dict:
    lines = [line for line in stdout.splitlines() if line.startswith("SUMMARY_JSON ")]
    assert lines, stdout[-3000:]
    return json.loads(lines[-1].removeprefix("SUMMARY_JSON "))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    return write_sample_dataset(tmp_path_factory.mktemp("sample") / "sample.parquet")


def _stop_cluster(temp_dir: str, gcs_port: int) -> None:
    """Stop only the cluster this test started: `ray stop` would kill every Ray on the machine, the
    test session's own included. Its processes name its temp dir or its GCS address on their command
    line; their children (agents, workers) go with them."""
    import psutil

    def ours(args: list[str]) -> bool:
        return any(temp_dir in a or (a.startswith("--address=") and a.endswith(f":{gcs_port}")) for a in args)

    procs = [p for p in psutil.process_iter(["cmdline"]) if ours(p.info["cmdline"] or [])]
    procs += [child for p in procs for child in p.children(recursive=True)]  # agents and workers
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    psutil.wait_procs(procs, timeout=30)


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
    # `python` in a job's entrypoint must be this environment's, as it is on a cluster built from it
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    env.update(PYTHONUNBUFFERED="1", RAY_USAGE_STATS_ENABLED="0", HF_HUB_OFFLINE="1", **extra)
    return env


def test_local_run_of_the_demo_config(tiny_model, sample, tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "jobs.run", "--config", DEMO, "--input", str(sample), "--output", str(out),
           "--model", tiny_model]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = _summary(proc.stdout)
    assert "audit            ok: 12 input rows, 12 output rows, 0 missing, 0 duplicated" in proc.stdout
    assert summary["status"] == {"ok": 10, "error": 2}
    assert summary["error_codes"] == {"IMAGE_DECODE_ERROR": 1, "MISSING_INPUT": 1}
    table = pq.read_table(out)
    assert sorted(table.column("id").to_pylist()) == sorted(r["id"] for r in sample_rows())
    assert (out / f"_run-{summary['run_id']}.json").is_file()
    # vLLM's per-request and per-module warnings, once for the run's one engine (actors.log_once): 13
    # requests and ~100 modules without a LoRA kernel used to print one line each
    log = proc.stdout + proc.stderr
    assert log.count("`torch.set_num_threads` after the thread binding") == 1, log[-3000:]
    assert log.count("no matching PunicaWrapper") == 1, log[-3000:]
    # A second run in 'error' mode refuses to touch existing output, with advice, exit status 2 is config-level
    again = subprocess.run(
        cmd + ["--mode", "error"], cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600
    )
    assert again.returncode == 2 and again.stderr.count("\n") == 1 and "Try output.mode" in again.stderr


def _wait_for_job_server(ray: str, url: str, env: dict, timeout_s: float = 300) -> None:
    """`ray start` returns before the dashboard and the head node's job agent are up: a submit right away
    failed once on a loaded 2-core machine with "No available agent to submit job". Wait, with a deadline,
    until the dashboard answers and then until a no-op job runs through the whole job path."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(f"{url}/api/version", timeout=5) as reply:
                if reply.status == 200:
                    break
        except OSError:
            pass
        assert time.monotonic() < deadline, f"the dashboard at {url} did not answer within {timeout_s} s"
        time.sleep(0.5)
    last = ""
    while time.monotonic() < deadline:
        probe = [ray, "job", "submit", f"--address={url}", "--", "python", "-c", "pass"]
        try:
            done = subprocess.run(probe, env=env, capture_output=True, text=True, timeout=120)
        except subprocess.TimeoutExpired as e:
            last = f"timed out: {e}"
            continue
        if done.returncode == 0:
            return
        last = done.stdout[-1500:] + done.stderr[-1500:]
        time.sleep(2)
    raise AssertionError(f"the job server at {url} ran no job within {timeout_s} s: {last}")


def test_ray_job_submit_against_a_running_cluster(tiny_model, sample, tmp_path):
    ray = os.path.join(os.path.dirname(sys.executable), "ray")
    port, dash = _free_port(), _free_port()
    env = _env(RAY_AUTH_MODE="disabled")  # a loopback-only test cluster
    short_tmp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # Ray's socket paths must stay under 107 bytes
    start = [ray, "start", "--head", f"--port={port}", f"--dashboard-port={dash}", "--dashboard-host=127.0.0.1",
             "--num-cpus=2", "--disable-usage-stats", f"--temp-dir={short_tmp}"]  # fmt: skip
    subprocess.run(start, env=env, check=True, capture_output=True, timeout=300)
    try:
        _wait_for_job_server(ray, f"http://127.0.0.1:{dash}", env)
        out = tmp_path / "out"
        submit = [ray, "job", "submit", f"--address=http://127.0.0.1:{dash}", "--working-dir", ".", "--",
                  "python", "-m", "jobs.run", "--config", DEMO, "--input", str(sample), "--output", str(out),
                  "--model", tiny_model, "--limit", "4", "--set", "progress.every_s=1"]  # fmt: skip
        proc = subprocess.run(submit, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        summary = _summary(proc.stdout)
        assert summary["rows_written"] == 4 and summary["audit"]["ok"]
        assert pq.read_table(out).num_rows == 4
        # no terminal under `ray job submit`: progress comes as log lines (every second, by the --set)
        progress = [line for line in (proc.stdout + proc.stderr).splitlines() if "progress: " in line]
        assert progress and "/4 rows" in progress[-1], proc.stdout[-3000:]
        assert (out / f"_run-{summary['run_id']}.png").is_file()
        assert summary["provenance"]["devices"] == ["cpu"]
    finally:
        _stop_cluster(short_tmp, port)
