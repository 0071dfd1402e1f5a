"""`python -m jobs.run` as users run it: locally (as `make demo` does) and submitted to a running Ray
head with token authentication on, by the README's recipe (`python -m jobs.submit`). Both run vLLM's
unmodified, full-size SigLIP tower (no init_hook), so an image costs seconds here: the inputs stay few."""

import contextlib
import json
import os
import shlex
import socket
import subprocess
import sys
import tempfile
import time

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
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "RAY_AUTH"))}
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


def _readme_recipe() -> list[list[str]]:
    """The commands of the README's "On a cluster" block, one argv each (comments dropped, continued
    lines joined)."""
    text = (REPO / "README.md").read_text()
    block = text[text.index("```bash\n", text.index("On a cluster (see `ray_cluster.yaml`)")) + 8 :]
    block = block[: block.index("```")].replace("\\\n", " ")
    commands = [shlex.split(line, comments=True) for line in block.splitlines()]
    return [argv for argv in commands if argv]


def _wait_for_job_server(submit: list[str], env: dict, timeout_s: float = 300) -> None:
    """`ray start` returns before the dashboard and the head node's job agent are up: a submit right away
    failed once on a loaded 2-core machine with "No available agent to submit job". Wait, with a deadline,
    until a no-op job runs through the whole job path."""
    deadline = time.monotonic() + timeout_s
    last = ""
    while time.monotonic() < deadline:
        try:
            done = subprocess.run(submit + ["python", "-c", "pass"], cwd=REPO, env=env, capture_output=True,
                                  text=True, timeout=120)  # fmt: skip
        except subprocess.TimeoutExpired as e:
            last = f"timed out: {e}"
            continue
        if done.returncode == 0:
            return
        last = done.stdout[-1500:] + done.stderr[-1500:]
        time.sleep(2)
    raise AssertionError(f"the job server ran no job within {timeout_s} s: {last}")


@pytest.fixture
def recipe_head(tmp_path):
    """A local head started by the README's recipe, in a fresh HOME (a new user's): this environment's
    `ray` (as after `source .venv/bin/activate`), `ray get-auth-token --generate`, then `ray start --head`
    with Ray 2.60's default authentication (no RAY_AUTH_MODE), plus this test's ports and temp dir.
    Yields the `python -m jobs.submit --address URL --` prefix and the submitter's environment (the same
    HOME, so the same ~/.ray/auth_token). Always stopped."""
    activate, get_token, start, submit = _readme_recipe()
    assert activate == ["source", ".venv/bin/activate"]
    assert get_token == ["ray", "get-auth-token", "--generate"] and start[:3] == ["ray", "start", "--head"]
    assert submit[:6] == ["python", "-m", "jobs.submit", "--address", "http://HEAD:8265", "--"]
    home = tmp_path / "home"
    home.mkdir()
    env = _env(HOME=str(home))
    ray = os.path.join(os.path.dirname(sys.executable), "ray")
    subprocess.run([ray, *get_token[1:]], env=env, check=True, capture_output=True, timeout=120)
    port, dash = _free_port(), _free_port()
    short_tmp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # Ray's socket paths must stay under 107 bytes
    ours = [f"--port={port}", f"--dashboard-port={dash}", "--dashboard-host=127.0.0.1", "--num-cpus=2",
            "--disable-usage-stats", f"--temp-dir={short_tmp}"]  # fmt: skip
    try:
        given = [a for a in start[1:] if not a.startswith("--dashboard-host")]  # this test's: loopback only
        subprocess.run([ray, *given, *ours], env=env, check=True, capture_output=True, timeout=300)
        prefix = [sys.executable, "-m", "jobs.submit", "--address", f"http://127.0.0.1:{dash}", "--"]
        _wait_for_job_server(prefix, env)
        yield prefix, env
    finally:
        _stop_cluster(short_tmp, port)


def test_the_readme_recipe_submits_to_a_head_with_token_auth(recipe_head, tiny_model, sample, tmp_path):
    submit, env = recipe_head
    address = submit[4]
    # the head has token authentication on: `ray job submit` without RAY_AUTH_MODE=token sends no token
    plain = [os.path.join(os.path.dirname(sys.executable), "ray"), "job", "submit", f"--address={address}",
             "--", "python", "-c", "pass"]  # fmt: skip
    refused = subprocess.run(plain, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert refused.returncode != 0 and "no authentication token was found" in refused.stdout + refused.stderr
    # jobs.submit without the token: exit 2, one line saying where to put it
    no_token = subprocess.run(submit + ["python", "-c", "pass"], cwd=REPO, env={**env, "HOME": str(tmp_path)},
                              capture_output=True, text=True, timeout=300)  # fmt: skip
    assert no_token.returncode == 2, no_token.stdout[-3000:] + no_token.stderr[-3000:]
    assert no_token.stderr.count("\n") == 1 and "~/.ray/auth_token" in no_token.stderr
    # a job mistake in the entrypoint (exit 2 there) is exit 2 here, its one line in the printed log
    out = tmp_path / "out"
    job = ["python", "-m", "jobs.run", "--config", DEMO, "--input", str(sample), "--output", str(out)]
    bad = subprocess.run(submit + job + ["--model", str(tmp_path / "no-model")], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert bad.returncode == 2, bad.stdout[-3000:] + bad.stderr[-3000:]
    assert "phi4mm-batch: error: model.path" in bad.stdout and not out.exists()
    # a run: exit 0, the job's log (progress lines, the summary) printed as `ray job submit` prints it
    args = ["--model", tiny_model, "--limit", "4", "--set", "progress.every_s=1"]
    proc = subprocess.run(submit + job + args, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = _summary(proc.stdout)
    assert summary["rows_written"] == 4 and summary["audit"]["ok"]
    assert pq.read_table(out).num_rows == 4
    # no terminal under the job server: progress comes as log lines (every second, by the --set)
    progress = [line for line in (proc.stdout + proc.stderr).splitlines() if "progress: " in line]
    assert progress and "/4 rows" in progress[-1], proc.stdout[-3000:]
    assert (out / f"_run-{summary['run_id']}.png").is_file()
    assert summary["provenance"]["devices"] == ["cpu"]
