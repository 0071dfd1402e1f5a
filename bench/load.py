"""Memory under load: the whole pipeline (``python -m jobs.run``, tiny model, vLLM's CPU backend) on 2,000
and 20,000 text+audio rows, with the peak RSS of the driver and of each kind of actor.

    python -m bench.load [--rows 2000,20000] [--work DIR]

Memory must stay flat as rows grow: no dataset is materialised and no rows are pulled to the driver.
Every 0.5 s it samples the memory of the driver and of its descendants (its local Ray; other Ray
clusters on the machine are left out), grouped by what the process is: peak RSS, peak private memory
(RSS less shared pages: the object store's pages count in the RSS of every process that maps them) and
the private peak in each half of the run (memory that grows with rows shows as a second half above the
first). Keeps each run's log and samples in the work directory; writes ``bench/results/load-<host>.json``
and prints the table. docs/reliability.md, "Memory under load", has the figures and what they mean.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
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


def role(cmdline: list[str]) -> str | None:
    """What a process of the run's Ray is, from its command line (Ray names actor processes ray::<Class>)."""
    text = " ".join(cmdline)
    if "PreprocessRows" in text:
        return "cpu actor"
    if "GenerateRows" in text:
        return "gpu actor"
    if "ray::" in text or "default_worker.py" in text:  # a worker before it names itself ray::...
        return "other ray worker"
    if any(k in text for k in ("raylet", "gcs_server", "dashboard", "log_monitor", "runtime_env")):
        return "ray services"
    return None


def sample(driver_pid: int, samples: list, stop: threading.Event) -> None:
    """Appends ``(seconds since start, kind, pid, rss, private)`` every 0.5 s for the driver and its
    descendants only (its local Ray): other Ray clusters on the machine are not this run's. ``private``
    is RSS less shared pages: Ray's object store is shared memory that every process reading an object
    maps, and its pages count in each reader's RSS although the store holds them once."""
    import psutil

    driver, started = psutil.Process(driver_pid), time.monotonic()
    while not stop.wait(0.5):
        try:
            procs = [driver, *driver.children(recursive=True)]
        except psutil.Error:
            continue
        now = time.monotonic() - started
        for p in procs:
            try:
                kind = "driver" if p.pid == driver_pid else role(p.cmdline())
                if kind:
                    mem = p.memory_info()
                    samples.append((now, kind, p.pid, mem.rss, mem.rss - mem.shared))
            except psutil.Error:
                continue


def memory_figures(samples: list) -> dict:
    """Per kind of process: peak RSS and peak private memory (MiB, the largest process of that kind), the
    private peak in each half of the run (memory that grows with rows shows as a second half above the
    first), and how many processes of that kind there were."""
    end = max((t for t, *_ in samples), default=0.0)
    figures: dict = {}
    for kind in sorted({k for _, k, *_ in samples}):
        mine = [s for s in samples if s[1] == kind]
        halves = [[s for s in mine if (s[0] <= end / 2) == first] for first in (True, False)]
        figures[f"{kind}.peak_rss_mib"] = round(max(s[3] for s in mine) / 2**20)
        figures[f"{kind}.peak_private_mib"] = round(max(s[4] for s in mine) / 2**20)
        for name, half in zip(("1st_half", "2nd_half"), halves, strict=True):
            figures[f"{kind}.private_mib_{name}"] = round(max((s[4] for s in half), default=0) / 2**20)
        figures[f"{kind}.processes"] = len({s[2] for s in mine})
    return figures


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
    started, started_at = time.perf_counter(), time.time()
    driver = subprocess.Popen([sys.executable, "-m", "jobs.run", "--config", str(config)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    samples: list = []
    stop = threading.Event()
    sampler = threading.Thread(target=sample, args=(driver.pid, samples, stop), daemon=True)
    sampler.start()
    output = driver.communicate()[0]
    stop.set()
    sampler.join()
    (work / f"log-{rows}.txt").write_text(output)  # the run's own log, kept to read afterwards
    if driver.returncode != 0:
        raise RuntimeError(f"jobs.run exited {driver.returncode}:\n{output[-3000:]}")
    (work / f"memory-{rows}.json").write_text(json.dumps(samples))  # every sample, to plot or inspect
    figures = memory_figures(samples)
    figures["wall_s"] = round(time.perf_counter() - started, 1)
    figures["rows_per_s"] = round(rows / figures["wall_s"], 2)
    summary = json.loads(output.split("SUMMARY_JSON ", 1)[1].splitlines()[0])
    figures["parts"] = summary["parts"]["count"]  # part files the run committed
    figures.update(phase_figures(samples, started_at, output))
    return figures


def phase_figures(samples: list, started_at: float, log: str) -> dict:
    """The driver's peak private memory (MiB) up to the moment the CPU stage's actor was last seen (the
    input read and prepared; what the GPU stage has not taken yet is queued), up to the end of the
    stream (Ray Data's "execution finished" log line), and after it (the audit)."""
    driver = [(t, p) for t, kind, _, _, p in samples if kind == "driver"]
    cpu_done = max((t for t, kind, *_ in samples if kind == "cpu actor"), default=0.0)
    finished = [line for line in log.splitlines() if "execution finished" in line]
    end = driver[-1][0]
    if finished:  # "2026-12-02 01:29:22,209	INFO streaming_executor.py:... execution finished"
        stamp = time.mktime(time.strptime(finished[-1][:19], "%Y-%m-%d %H:%M:%S"))
        end = stamp + int(finished[-1][20:23]) / 1000 - started_at

    def at(t: float) -> int:
        return round(max((p for s, p in driver if s <= t), default=0) / 2**20)

    after = [p for s, p in driver if s > end]
    return {
        "driver.private_mib_cpu_stage_done": at(cpu_done),
        "driver.private_mib_stream_end": at(end),
        "driver.private_mib_audit": round(max(after, default=0) / 2**20),
        "cpu_stage_done_s": round(cpu_done, 1),
        "stream_end_s": round(end, 1),
    }


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
