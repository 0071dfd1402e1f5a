"""The pipeline with input, media and output on an S3 endpoint (tests/s3_server.py, or a real store with
PHI4MM_TEST_S3_ENDPOINT): a killed run resumed, an overwrite, the audit and the manifest, every input row
answered exactly once, with credentials as users give them (the killed run from the AWS environment
variables, the resumed one from a profile in AWS config files) and nothing secret in the manifest, the
markers or the logs."""

import contextlib
import json
import os
import subprocess
import sys
import time

import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from pipelines.output.commit import committed_ids
from pipelines.phi4mm import run_pipeline
from schemas import storage
from tests.helpers import MEDIA, REPO, make_config

IDS = [f"r{i:03d}" for i in range(40)]


def _input(s3) -> str:
    """Text rows, image rows by s3:// path and by path relative to the media root, audio rows by path,
    and a dead link: 40 rows."""
    s3.put("media/cat.jpg", (MEDIA / "cat.jpg").read_bytes())
    s3.put("media/fox.wav", (MEDIA / "fox.wav").read_bytes())
    rows = []
    for n, row_id in enumerate(IDS):
        row = {"id": row_id, "prompt": f"tell me about {row_id}", "image": None, "audio": None}
        if n % 10 == 1:
            row["image"] = s3.url("media/cat.jpg")
        elif n % 10 == 2:
            row["image"] = "cat.jpg"
        elif n % 10 == 3:
            row["audio"] = "fox.wav"
        elif n % 10 == 4:
            row["image"] = "gone.jpg"
        rows.append(row)
    sink = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_pylist(rows), sink)
    return s3.put("in/data.parquet", sink.getvalue().to_pybytes())


def _config(tiny_model, tmp_path, s3, **output):
    return make_config(
        tiny_model, tmp_path,
        input={"path": _input(s3), "media_root": s3.url("media")},
        output={"path": s3.url("out"), "mode": "resume", "commit_every_rows": 4, **output},
        engine={"init_hook": "jobs.tiny_vision:shrink_siglip"},
        storage={"s3_endpoint": s3.endpoint},
    )  # fmt: skip


def _output_ids(s3) -> list[str]:
    storage.use(storage.current())
    return sorted(committed_ids(s3.url("out")).to_pylist())


def _no_secret_in(s3, *texts: str) -> None:
    secret = os.environ["AWS_SECRET_ACCESS_KEY"]
    for key in s3.keys("out/"):
        if key.endswith(".json") or key.endswith("_lock"):
            assert secret not in s3.fs.open_input_stream(f"{s3.name}/{key}").read().decode(), key
    for text in texts:
        assert secret not in text


def _profile_env(env: dict, tmp_path) -> dict:
    """``env`` with the credentials moved from AWS environment variables into a profile of AWS config
    files (``~/.aws/credentials`` and ``~/.aws/config``, here under ``tmp_path``), as users keep them."""
    (tmp_path / "aws-credentials").write_text(
        f"[phi4mm-test]\naws_access_key_id = {env['AWS_ACCESS_KEY_ID']}\n"
        f"aws_secret_access_key = {env['AWS_SECRET_ACCESS_KEY']}\n"
    )
    (tmp_path / "aws-config").write_text(
        f"[profile phi4mm-test]\nregion = {env.get('AWS_REGION', 'us-east-1')}\n"
    )
    plain = {k: v for k, v in env.items() if k not in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                                                        "AWS_SESSION_TOKEN", "AWS_REGION")}  # fmt: skip
    return {**plain, "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "aws-credentials"),
            "AWS_CONFIG_FILE": str(tmp_path / "aws-config"), "AWS_PROFILE": "phi4mm-test"}  # fmt: skip


def test_a_killed_run_on_the_store_resumes_every_row_once(tiny_model, tmp_path, s3):
    config = _config(tiny_model, tmp_path, s3)
    raw = config.model_dump(mode="json", exclude_defaults=True)
    raw["sampling"] = {"max_tokens": 48, "ignore_eos": True}  # long enough to be killed between commits
    raw["resources"]["generate"].update(batch_size=4, concurrent_batches=1)
    raw["resources"]["preprocess"].update(batch_size=4)
    cfg = tmp_path / "job.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    cmd = [sys.executable, "-m", "jobs.run", "--config", str(cfg)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "RAY_USAGE_STATS_ENABLED": "0", "HF_HUB_OFFLINE": "1"}
    env.pop("RAY_ADDRESS", None)
    assert "AWS_SECRET_ACCESS_KEY" in env  # credentials as users give them, never in the config
    storage.use(config.storage)
    ray_procs: list[psutil.Process] = []
    with open(tmp_path / "first.log", "w") as log:
        first = subprocess.Popen(cmd + ["--run-id", "doomed"], cwd=REPO, env=env, stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + 400
        while not [k for k in s3.keys("out/") if "/part-" in k] and first.poll() is None:
            assert time.monotonic() < deadline, "no part committed in time"
            time.sleep(0.2)  # polling the store for the first part, not waiting a fixed time
        assert first.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
        ray_procs = psutil.Process(first.pid).children(recursive=True)
        first.kill()
        first.wait()
    finally:
        first.kill()
        for proc in ray_procs:
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.kill()
        psutil.wait_procs(ray_procs, timeout=30)
    done_before = _output_ids(s3)
    assert 0 < len(done_before) < len(IDS), "the kill did not land mid-run"

    resumed = subprocess.run(cmd, cwd=REPO, env=_profile_env(env, tmp_path), capture_output=True, text=True,
                             timeout=600)  # fmt: skip
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "taking over the lock" in resumed.stderr
    summary = json.loads(resumed.stdout.split("SUMMARY_JSON ", 1)[1])
    assert summary["rows_skipped_already_done"] == len(done_before)
    assert summary["rows_written"] == len(IDS) - len(done_before) and summary["audit"]["ok"]
    assert _output_ids(s3) == IDS  # every row exactly once
    table = pa.concat_tables(
        pq.read_table(f"{s3.name}/{k}", filesystem=s3.fs) for k in s3.keys("out/") if "/part-" in k
    )
    codes = dict(zip(table.column("id").to_pylist(), table.column("error_code").to_pylist(), strict=True))
    assert {codes[i] for n, i in enumerate(IDS) if n % 10 == 4} == {"MEDIA_NOT_FOUND"}
    assert all(codes[i] is None for n, i in enumerate(IDS) if n % 10 in (1, 2, 3))  # s3 media read
    assert not [k for k in s3.keys("out/") if "_tmp" in k or k.endswith("/_lock")]
    # the killed run got the marker it never wrote, from the run that took its lock over
    index = json.loads(s3.fs.open_input_stream(f"{s3.name}/out/_committed.json").read())
    assert {m["run_id"]: m["mode"] for m in index["runs"]} == {
        "doomed": "interrupted",
        summary["run_id"]: "resume",
    }
    doomed = next(m for m in index["runs"] if m["run_id"] == "doomed")
    assert doomed["parts"] == sorted(k.rsplit("/", 1)[1] for k in s3.keys("out/") if "/part-doomed-" in k)
    manifest = s3.fs.open_input_stream(f"{s3.name}/out/_run-{summary['run_id']}.json").read().decode()
    assert json.loads(manifest)["audit"]["ok"]
    _no_secret_in(s3, manifest, resumed.stdout, resumed.stderr, (tmp_path / "first.log").read_text())


def test_an_overwrite_on_the_store_replaces_the_output_whole(local_ray, tiny_model, tmp_path, s3):
    config = _config(tiny_model, tmp_path, s3)
    limited = config.model_copy(update={"input": config.input.model_copy(update={"limit": 10})})
    first = run_pipeline(limited, "first")
    assert first["audit"]["ok"] and _output_ids(s3) == IDS[:10]
    old_parts = [k for k in s3.keys("out/") if "/part-first-" in k]
    over = config.model_copy(update={"output": config.output.model_copy(update={"mode": "overwrite"})})
    summary = run_pipeline(over, "second")
    assert summary["audit"]["ok"] and summary["committed"] and summary["rows_written"] == len(IDS)
    assert _output_ids(s3) == IDS
    parts = [k for k in s3.keys("out/") if "/part-" in k]
    assert parts and all("/part-second-" in k for k in parts) and not set(old_parts) & set(parts)
    assert not [k for k in s3.keys("out/") if "_staging-" in k]
    index = json.loads(s3.fs.open_input_stream(f"{s3.name}/out/_committed.json").read())
    assert [m["run_id"] for m in index["runs"]] == ["first", "second"]
    assert sorted(index["runs"][1]["replaces"]) == sorted(k.rsplit("/", 1)[1] for k in old_parts)
    _no_secret_in(s3, json.dumps(summary))
