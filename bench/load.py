"""Memory under load: the whole pipeline (``python -m jobs.run``, tiny model, vLLM's CPU backend) on 2,000
and 20,000 text+audio rows, with the peak RSS of the driver and of each kind of actor.

    python -m bench.load [--rows 2000,20000] [--work DIR]

Memory must stay flat as rows grow: no dataset is materialised and no rows are pulled to the driver, so
the driver's and each actor's peak should barely move between the two sizes. Every 0.5 s it samples the
RSS of every process of the run (psutil), grouped by what the process is; writes
``bench/results/load-<host>.json`` and prints the table.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path

import yaml

from bench.gpu import PROFILES, merge
from bench.report import write_report

# bench/gpu.py's cpu profile (the demo's settings, 2-core machine), with short answers and bigger batches
JOB = merge(
    PROFILES["cpu"]["job"],
    {
        "sampling": {"max_tokens": 4},
        "resources": {"preprocess": {"batch_size": 32}, "generate": {"batch_size": 32}},
    },
)


def role(cmdline: list[str], driver_pid: int, pid: int) -> str | None:
    """What a process of the run is, from its command line (Ray names actor processes ray::<Class>)."""
    text = " ".join(cmdline)
    if pid == driver_pid:
        return "driver"
    if "PreprocessRows" in text:
        return "cpu actor"
    if "GenerateRows" in text:
        return "gpu actor"
    if "ray::" in text:
        return "other ray worker"
    if any(k in text for k in ("raylet", "gcs_server", "dashboard", "log_monitor", "runtime_env")):
        return "ray services"
    return None


def sample(driver_pid: int, peaks: dict, stop: threading.Event) -> None:
    import psutil

    while not stop.wait(0.5):
        for p in psutil.process_iter(["pid", "cmdline", "memory_info"]):
            try:
                kind = role(p.info["cmdline"] or [], driver_pid, p.info["pid"])
                if kind and p.info["memory_info"]:
                    key = (kind, p.info["pid"])
                    peaks[key] = max(peaks.get(key, 0), p.info["memory_info"].rss)
            except psutil.Error:
                continue


def run(rows: int, work: Path, model: Path) -> dict:
    from bench.dataset import build_dataset

    data = work / f"data-{rows}"
    if not data.exists():
        build_dataset(data, rows=rows, mix="audio=0.5,text=0.5", audio_seconds=(1, 3))
    job = {
        **JOB,
        "input": {"path": str(data)},
        "output": {"path": str(work / f"out-{rows}"), "mode": "overwrite"},
    }
    job["model"] = {**JOB["model"], "path": str(model)}
    config = work / f"load-{rows}.yaml"
    config.write_text(yaml.safe_dump(job))
    started = time.perf_counter()
    driver = subprocess.Popen([sys.executable, "-m", "jobs.run", "--config", str(config)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    peaks: dict = {}
    stop = threading.Event()
    sampler = threading.Thread(target=sample, args=(driver.pid, peaks, stop), daemon=True)
    sampler.start()
    output = driver.communicate()[0]
    stop.set()
    sampler.join()
    if driver.returncode != 0:
        raise RuntimeError(f"jobs.run exited {driver.returncode}:\n{output[-3000:]}")
    per_role = defaultdict(list)
    for (kind, _), rss in peaks.items():
        per_role[kind].append(rss / 2**20)
    figures = {f"{kind}.peak_rss_mib": round(max(v)) for kind, v in sorted(per_role.items())}
    figures.update({f"{kind}.processes": len(v) for kind, v in sorted(per_role.items())})
    figures["wall_s"] = round(time.perf_counter() - started, 1)
    figures["rows_per_s"] = round(rows / figures["wall_s"], 2)
    return figures


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="2000,20000", help="dataset sizes, comma-separated")
    parser.add_argument("--work", help="scratch directory (datasets, outputs); kept")
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    from jobs.make_tiny_model import write_tiny_checkpoint

    work = Path(args.work or tempfile.mkdtemp(prefix="bench-load-"))
    model = work / "model"
    if not (model / "config.json").exists():
        write_tiny_checkpoint(model, dynamic_hd=1)
    figures = {}
    for rows in (int(r) for r in args.rows.split(",")):
        figures.update({f"{rows}.{k}": v for k, v in run(rows, work, model).items()})
        print(f"{rows} rows done", flush=True)
    write_report("load", figures, args.out)


if __name__ == "__main__":
    main()
