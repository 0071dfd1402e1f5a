"""Output you cannot lose or double, on a local Ray with the real vLLM CPU engine (SigLIP shrunk, text rows
only, so each run is short): a driver killed mid-run is resumed with every row exactly once while a second
writer is refused; float ids resume without duplicates; an overwrite is validated before it touches
anything and swaps the new output in whole, so readers always see the old rows or the new ones."""

import contextlib
import json
import os
import subprocess
import sys
import threading
import time

import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from pipelines.output.commit import committed_ids, committed_parts
from pipelines.output.ids import id_strings
from pipelines.phi4mm import run_pipeline
from schemas.errors import JobError
from tests.helpers import REPO, make_config

TEXT = pa.schema([("id", pa.string()), ("prompt", pa.string())])


def _dataset(path, ids, schema=TEXT):
    pq.write_table(
        pa.Table.from_pylist([{"id": i, "prompt": f"tell me about {i}"} for i in ids], schema=schema), path
    )
    return path


def _config(tiny_model, tmp_path, data, **output):
    return make_config(
        tiny_model,
        tmp_path,
        input={"path": str(data)},
        output={"path": str(tmp_path / "out"), "mode": "resume", **output},
        engine={"init_hook": "jobs.tiny_vision:shrink_siglip"},
    )


def _env():
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    env.update(PYTHONUNBUFFERED="1", RAY_USAGE_STATS_ENABLED="0", HF_HUB_OFFLINE="1")
    return env


def _wait_for(condition, timeout_s, what):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


def _summary(stdout: str) -> dict:
    lines = [line for line in stdout.splitlines() if line.startswith("SUMMARY_JSON ")]
    assert lines, stdout[-3000:]
    return json.loads(lines[-1].removeprefix("SUMMARY_JSON "))


def test_a_killed_run_resumes_every_row_once_and_a_second_writer_is_refused(tiny_model, tmp_path):
    ids = [f"r{i:03d}" for i in range(80)]
    # Parts of 12 rows from blocks of 4 (no part by age: commit_every_s is an hour).
    data = _dataset(tmp_path / "in.parquet", ids)
    config = _config(tiny_model, tmp_path, data, commit_every_rows=12, commit_every_s=3600)
    raw = config.model_dump(mode="json", exclude_defaults=True)
    # Long enough to be killed between commits: one batch of 4 rows in the engine at a time, 64 tokens each.
    raw["sampling"] = {"max_tokens": 64, "ignore_eos": True}
    raw["resources"]["generate"].update(batch_size=4, concurrent_batches=1)
    raw["resources"]["preprocess"].update(batch_size=4)
    cfg = tmp_path / "job.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "jobs.run", "--config", str(cfg)]
    ray_procs: list[psutil.Process] = []
    with open(tmp_path / "first.log", "w") as log:
        first = subprocess.Popen(cmd + ["--run-id", "doomed"], cwd=REPO, env=_env(), stdout=log, stderr=log)
    try:
        _wait_for(lambda: (out / "_lock").exists(), 120, "the first run to take the output's lock")
        started = time.monotonic()
        second = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=120)
        assert second.returncode == 2, second.stdout[-2000:] + second.stderr[-2000:]
        assert (
            second.stderr.count("\n") == 1 and f"output {out} is being written by run doomed" in second.stderr
        )
        assert time.monotonic() - started < 60  # refused before any Ray or engine start

        _wait_for(lambda: committed_parts(str(out)) or first.poll() is not None, 400, "a committed part")
        assert first.poll() is None, "the first run ended before it could be killed mid-way"
        ray_procs = psutil.Process(first.pid).children(recursive=True)  # its local Ray
        first.kill()  # SIGKILL: the driver dies as an OOM kill or a lost node would end it
        first.wait()
    finally:
        first.kill()
        for proc in ray_procs:  # only the processes this test started
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.kill()
        psutil.wait_procs(ray_procs, timeout=30)
    done_before = sorted(committed_ids(str(out)).to_pylist())
    assert 0 < len(done_before) < len(ids), "the kill did not land mid-run"
    # every committed part is whole (12 rows, 3 blocks): the rows waiting for the next part were lost
    assert {pq.read_metadata(p).num_rows for p in committed_parts(str(out))} == {12}
    (out / "_tmp").mkdir(exist_ok=True)
    (out / "_tmp" / "part-doomed-000009-0000.parquet.0123abcd").write_bytes(b"PAR1 half a part")

    resumed = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "taking over the lock" in resumed.stderr and "run doomed" in resumed.stderr
    assert "stale temporary files" in resumed.stderr
    summary = _summary(resumed.stdout)
    assert summary["rows_skipped_already_done"] == len(done_before)
    assert summary["rows_written"] == len(ids) - len(done_before) and summary["audit"]["ok"]
    assert sorted(pq.read_table(out).column("id").to_pylist()) == ids  # every row exactly once
    assert list((out / "_tmp").iterdir()) == [] and not (out / "_lock").exists()
    assert summary["parts"]["count"] == -(-summary["rows_written"] // 12)  # parts of 12, not one per block


FLOAT_IDS = [0.5, 1.0, 2.0, 2.25, 3.0, 1e20, -4.0, 7.125, 8.0, 9.5]


@pytest.fixture(scope="module")
def float_runs(local_ray, tiny_model, tmp_path_factory):
    """A --limit run, then a resume of the whole input, on float ids (which the audit used to miss and every
    resume used to duplicate)."""
    tmp = tmp_path_factory.mktemp("float")
    data = _dataset(tmp / "in.parquet", FLOAT_IDS, pa.schema([("id", pa.float64()), ("prompt", pa.string())]))
    config = _config(tiny_model, tmp, data)
    limited = config.model_copy(update={"input": config.input.model_copy(update={"limit": 4})})
    first = run_pipeline(limited, "float-limited")
    after_limit = sorted(pq.read_table(config.output.path).column("id").to_pylist())
    return config, first, after_limit, run_pipeline(config, "float-rest")


def test_float_ids_resume_without_duplicates(float_runs):
    config, limited, after_limit, rest = float_runs
    expected = id_strings(pa.array(FLOAT_IDS)).to_pylist()
    assert expected[:2] == ["0.5", "1"]  # one string form everywhere (Python's str() would say "1.0")
    assert limited["audit"]["ok"] and limited["rows_written"] == limited["audit"]["input_rows"] == 4
    assert after_limit == sorted(expected[:4])  # --limit ran the first 4 rows in input order
    assert rest["rows_skipped_already_done"] == 4 and rest["rows_written"] == len(FLOAT_IDS) - 4
    out = pq.read_table(config.output.path).column("id").to_pylist()
    assert rest["audit"]["ok"] and sorted(out) == sorted(expected)  # each exactly once


def test_overwrite_is_validated_first_and_swapped_in_whole(float_runs, tiny_model, tmp_path):
    old_config = float_runs[0]
    out = old_config.output.path
    old = sorted(pq.read_table(out).column("id").to_pylist())
    new_ids = [f"n{i}" for i in range(6)]
    data = _dataset(tmp_path / "new.parquet", new_ids)
    config = _config(tiny_model, tmp_path, data, path=out, mode="overwrite")

    bad = make_config(
        tiny_model,
        tmp_path,
        input={"path": str(data), "columns": {"id": "key"}},
        output={"path": out, "mode": "overwrite"},
    )
    with pytest.raises(JobError, match="no id column 'key'"):
        run_pipeline(bad, "bad-overwrite")
    assert sorted(pq.read_table(out).column("id").to_pylist()) == old  # nothing was touched

    os.makedirs(f"{out}/_staging-ghost")
    with open(f"{out}/_staging-ghost/part-ghost-000000-0000.parquet", "wb") as f:
        f.write(b"an overwrite that died before its swap")
    seen, stop = [], threading.Event()

    def read_all_the_time():
        while not stop.is_set():
            with contextlib.suppress(
                OSError, pa.ArrowInvalid
            ):  # a part moved away between listing and reading
                seen.append(set(pq.read_table(out).column("id").to_pylist()))
            time.sleep(0.05)

    reader = threading.Thread(target=read_all_the_time, daemon=True)
    reader.start()
    try:
        summary = run_pipeline(config, "good-overwrite")
    finally:
        stop.set()
        reader.join(timeout=10)
    assert summary["audit"]["ok"] and summary["committed"] and summary["rows_written"] == len(new_ids)
    assert sorted(pq.read_table(out).column("id").to_pylist()) == new_ids  # exactly the new rows
    assert len(seen) > 10 and all(s >= set(old) or s >= set(new_ids) for s in seen)  # never none, never half
    assert set(old) in seen  # the old output stayed readable while the new one was made
    assert not os.path.exists(f"{out}/_staging-ghost") and not os.path.exists(
        f"{out}/_staging-good-overwrite"
    )
    marker = json.loads(open(f"{out}/_committed-good-overwrite.json").read())
    assert len(marker["parts"]) == summary["parts"]["count"] and marker["replaces"]
    assert sorted(marker["parts"])[:3] == summary["parts"]["first"]
