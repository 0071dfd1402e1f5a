"""jobs.submit without a cluster: the exit status it gives each way a job ends, the token it finds, and
its one-line errors (a stand-in job client; tests/integration/test_jobs_run.py submits to a real head)."""

import subprocess
import sys
from types import SimpleNamespace

import pytest
import ray.job_submission
from ray.exceptions import AuthenticationError
from ray.job_submission import JobStatus

from jobs import submit
from tests.helpers import REPO


@pytest.mark.parametrize(
    ("status", "code", "expected"),
    [
        ("SUCCEEDED", 0, 0),
        ("FAILED", 1, 1),  # audit failed
        ("FAILED", 2, 2),  # a job mistake: `ray job submit` says 1
        ("FAILED", 3, 3),
        ("FAILED", None, 3),  # runtime environment failed: the entrypoint never ran
        ("FAILED", -9, 3),  # killed by a signal
        ("STOPPED", None, 3),
    ],
)
def test_the_exit_status_is_the_entrypoints(status, code, expected):
    assert submit.exit_status(status, code) == expected


def _headers_with(env: dict) -> str:
    code = "from jobs.submit import auth_headers; print(auth_headers())"
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_the_token_is_found_where_ray_looks(tmp_path):
    """A subprocess each: Ray's token loader keeps what it found for the process."""
    home = tmp_path / "home"
    base = {"PATH": "/usr/bin:/bin", "HOME": str(home)}
    assert _headers_with(base) == "{}"
    (home / ".ray").mkdir(parents=True)
    (home / ".ray" / "auth_token").write_text("from-file")
    assert _headers_with(base) == "{'Authorization': 'Bearer from-file'}"
    assert _headers_with({**base, "RAY_AUTH_TOKEN": "from-env"}) == "{'Authorization': 'Bearer from-env'}"


class _Client:
    """JobSubmissionClient's calls jobs.submit makes, answering as a job that ends with ``info``."""

    submitted: dict = {}

    def __init__(self, address, headers=None, fail: Exception | None = None, info=None):
        if fail:
            raise fail
        self.info = info

    def submit_job(self, entrypoint, runtime_env):
        _Client.submitted = {"entrypoint": entrypoint, "runtime_env": runtime_env}
        return "raysubmit_1"

    async def tail_job_logs(self, job_id):
        yield "phi4mm-batch: error: a job mistake. Try something.\n"

    def get_job_info(self, job_id):
        return self.info


def _run(monkeypatch, capsys, **client):
    fake = lambda address, headers: _Client(address, headers, **client)  # noqa: E731
    monkeypatch.setattr(ray.job_submission, "JobSubmissionClient", fake)
    code = submit.main(["--address", "http://h:8265", "--", "python", "-m", "jobs.run", "--set", "a=b c"])
    return code, capsys.readouterr()


def test_a_failed_job_exits_with_the_entrypoints_status_and_prints_its_log(monkeypatch, capsys):
    info = SimpleNamespace(status=JobStatus.FAILED, driver_exit_code=2, message="Job entrypoint failed")
    code, out = _run(monkeypatch, capsys, info=info)
    assert code == 2 and "a job mistake" in out.out
    assert out.err.count("\n") == 1 and "raysubmit_1 submitted" in out.err  # nothing added to the job's line
    assert _Client.submitted == {
        "entrypoint": "python -m jobs.run --set 'a=b c'",  # quoted for the head's shell
        "runtime_env": {"working_dir": "."},
    }


def test_a_job_that_ended_without_the_entrypoints_status_is_3_with_one_line(monkeypatch, capsys):
    info = SimpleNamespace(status=JobStatus.STOPPED, driver_exit_code=None, message="Job was stopped.\nmore")
    code, out = _run(monkeypatch, capsys, info=info)
    assert code == 3
    assert out.err.splitlines()[-1] == (
        "phi4mm-batch: error: job raysubmit_1 ended STOPPED: Job was stopped. Try `ray job logs raysubmit_1`."
    )


@pytest.mark.parametrize(
    ("fail", "expected", "advice"),
    [
        (AuthenticationError("Authentication required: Unauthorized"), 2, "~/.ray/auth_token or RAY_"),
        (ConnectionError("Failed to connect to Ray at address: http://h:8265."), 3, "http://HEAD:8265"),
    ],
)
def test_a_refused_or_unreachable_cluster_is_one_line(monkeypatch, capsys, fail, expected, advice):
    code, out = _run(monkeypatch, capsys, fail=fail)
    assert code == expected and out.out == ""
    assert out.err.count("\n") == 1 and out.err.startswith("phi4mm-batch: error: ") and advice in out.err
