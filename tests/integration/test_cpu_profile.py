"""A shipped task preset on a CPU-only machine, as a new user runs it: the preset, then the CPU profile
(`--config` twice), the tiny checkpoint, and `--set` values typed the way users type them."""

import json
import os
import subprocess
import sys

import pyarrow.parquet as pq

from jobs.make_sample_data import write_sample_dataset
from tests.helpers import REPO


def test_task_caption_with_the_cpu_profile_end_to_end(tiny_model, tmp_path):
    sample = write_sample_dataset(tmp_path / "sample.parquet")
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "jobs.run", "--config", "jobs/configs/task_caption.yaml",
           "--config", "jobs/configs/profiles/cpu.yaml", "--input", str(sample), "--output", str(out),
           "--model", tiny_model, "--limit", "3",
           "--set", "engine.init_hook=jobs.tiny_vision:shrink_siglip",  # tests only: a 2-layer SigLIP
           "--set", "engine.env.HF_HUB_OFFLINE=1",  # the text "1", as typed
           "--set", "resources.preprocess={concurrency:1,batch_size:4,num_cpus:0.5}"]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
    env.update(PYTHONUNBUFFERED="1", RAY_USAGE_STATS_ENABLED="0", HF_HUB_OFFLINE="1")
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (line,) = [x for x in proc.stdout.splitlines() if x.startswith("SUMMARY_JSON ")]
    summary = json.loads(line.removeprefix("SUMMARY_JSON "))
    # the first three sample rows: two text-only rows (no image to caption) and the cat picture
    assert summary["audit"]["ok"] and summary["rows_written"] == 3
    assert summary["status"] == {"ok": 1, "error": 2} and summary["error_codes"] == {"MISSING_INPUT": 2}
    rows = {r["id"]: r for r in pq.read_table(out).to_pylist()}
    assert rows["image-cat"]["status"] == "ok" and rows["image-cat"]["caption"]  # the preset's column name
