"""A preset that asks for a GPU, run on this machine (no GPU): exit 2 naming the stage and the resource,
before any data is read and with nothing written, instead of waiting forever for a node that never comes."""

import os
import subprocess
import sys

from jobs.make_sample_data import write_sample_dataset
from tests.helpers import REPO


def test_a_stage_no_node_can_host_is_a_job_error_not_a_wait(tiny_model, tmp_path):
    sample = write_sample_dataset(tmp_path / "sample.parquet")
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "jobs.run", "--config", "jobs/configs/task_caption.yaml", "--input", str(sample),
           "--output", str(out), "--model", tiny_model, "--limit", "4",
           "--set", "model.load_format=dummy", "--set", "engine.dtype=float32"]  # fmt: skip
    env = {**os.environ, "RAY_ADDRESS": "", "CUDA_VISIBLE_DEVICES": ""}
    # the timeout only bounds the old behaviour (waiting forever); a pass takes Ray's start-up and no more
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 2, done.stderr[-3000:]
    assert "resources.generate asks for CPU 1, GPU 1 per actor, but no node can give it" in done.stderr
    assert "Try " in done.stderr.splitlines()[-1]
    assert not list(out.glob("part-*.parquet"))
