"""What running the input in segments (``resources.segment_rows``) saves the driver: the whole pipeline
(``pipelines.phi4mm.run_pipeline``: validation, read, the CPU stage, the GPU stage's actor, the writer,
the audit) on text rows, with the GPU stage's engine a stand-in that answers at once: the driver's
bookkeeping grows with blocks, not with the model, and a real engine would make 100,000 rows take hours
here. Writes bench/results/segments-<host>.json (``--out``: elsewhere).

    python -m bench.segments [--rows 100000] [--files 20] [--segment-rows 10000]

Runs the same input twice on one local Ray, as one Ray Data execution and in segments, and samples this
process's private memory (RSS less shared pages) every 0.2 s: the peak, and the growth from the end of the
first tenth of the run to its end. Allocator noise (hundreds of MiB of other allocations come and go)
hides a growth of a few MiB there, so it also traces the driver's Python allocations made by Ray Data's
own code (tracemalloc, a snapshot every 10 s): their peak above their level a tenth into the run is what
grows with blocks. The engine is the only stand-in; blocks are one CPU batch (32 rows), as in a real run.
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time
import tracemalloc
from pathlib import Path

from bench.report import write_report
from bench.tiny import tiny_checkpoint

MIB = 1 << 20


class InstantEngine:
    """The engine contract answered at once: a short text per request, no model."""

    def __init__(self, config):
        self.requests = 0

    def stats(self) -> dict:
        return {"requests": self.requests}

    def generate(self, requests) -> list:
        from actors.engines.contract import EngineResult

        self.requests += len(requests)
        return [EngineResult(text="ok", prompt_tokens=None, completion_tokens=1, finish_reason="length")
                for _ in requests]  # fmt: skip


def instant_engine(config) -> InstantEngine:
    return InstantEngine(config)


_build_stages = None  # pipelines.phi4mm's own, kept by main before it puts stand_in_stages in its place


def stand_in_stages(config, run_id: str, ledger=None) -> list:
    """``pipelines.phi4mm.build_stages`` with the GPU stage's engine made by ``instant_engine``."""
    cpu, gpu = _build_stages(config, run_id, ledger)
    kwargs = {**gpu.fn_constructor_kwargs, "engine_factory": instant_engine}
    return [cpu, gpu.model_copy(update={"fn_constructor_kwargs": kwargs, "env": {}})]


def write_input(root: Path, rows: int, files: int) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    bounds = [rows * f // files for f in range(files + 1)]  # every row in some file
    for f in range(files):
        ids = [f"r{i}" for i in range(bounds[f], bounds[f + 1])]
        pq.write_table(pa.table({"id": ids, "prompt": ["Say hello."] * len(ids)}), root / f"{f:04d}.parquet")


def private_mib() -> float:
    import psutil

    info = psutil.Process().memory_info()
    return (info.rss - info.shared) / MIB


def ray_data_traced_mib() -> float:
    """What the allocations made by Ray Data's code (ray/data/) that are still alive take, traced."""
    snapshot = tracemalloc.take_snapshot().filter_traces([tracemalloc.Filter(True, "*/ray/data/*")])
    return sum(stat.size for stat in snapshot.statistics("filename")) / MIB


def measured_run(config, run_id: str) -> dict:
    from pipelines.phi4mm import run_pipeline

    samples: list[tuple[float, float]] = []
    traced: list[tuple[float, float]] = []
    stop = threading.Event()

    def sample() -> None:
        last = 0.0
        while True:
            now = time.perf_counter()
            samples.append((now, private_mib()))
            if now - last >= 10:
                traced.append((now, ray_data_traced_mib()))
                last = now
            if stop.wait(0.2):
                return

    tracemalloc.start()
    started = time.perf_counter()
    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        summary = run_pipeline(config, run_id=run_id)
    finally:
        stop.set()
        thread.join()
        tracemalloc.stop()
    wall = time.perf_counter() - started
    tenth = next((m for t, m in samples if t - started >= wall / 10), samples[0][1])
    traced_tenth = next((m for t, m in traced if t - started >= wall / 10), traced[0][1])
    return {
        "rows_written": summary["rows_written"],
        "audit_ok": summary["audit"]["ok"],
        "executions": len(summary["engines"]),
        "wall_s": round(wall, 1),
        "driver_private_peak_mib": round(max(m for _, m in samples), 1),
        "driver_private_growth_mib": round(samples[-1][1] - tenth, 1),
        "ray_data_traced_growth_mib": round(max(m for _, m in traced) - traced_tenth, 2),
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--files", type=int, default=20)
    parser.add_argument("--segment-rows", type=int, default=10_000)
    parser.add_argument("--out")
    args = parser.parse_args(argv)

    import ray

    from pipelines import phi4mm
    from schemas.job import JobConfig

    work = Path(tempfile.mkdtemp(prefix="bench-segments-"))
    (work / "in").mkdir()
    write_input(work / "in", args.rows, args.files)
    model = tiny_checkpoint("vllm")
    global _build_stages
    _build_stages = phi4mm.build_stages
    phi4mm.build_stages = stand_in_stages  # the engine is the one stand-in
    ray.init(include_dashboard=False, log_to_driver=False, num_cpus=2)
    figures: dict = {"rows": args.rows, "files": args.files, "block_rows": 32}
    try:
        for name, segment_rows in (("one_execution", args.rows), ("segments", args.segment_rows)):
            config = JobConfig.model_validate({
                "input": {"path": str(work / "in"), "columns": {"image": None, "audio": None}},
                "output": {"path": str(work / f"out-{name}"), "mode": "overwrite", "commit_every_rows": 50_000},
                "model": {"path": str(model), "load_format": "dummy"}, "sampling": {"max_tokens": 1},
                "progress": {"plot": False},
                "resources": {"io_num_cpus": 0.25, "segment_rows": segment_rows,
                              "preprocess": {"concurrency": 1, "batch_size": 32, "num_cpus": 0.5},
                              "generate": {"concurrency": 1, "batch_size": 32, "num_cpus": 0.5, "num_gpus": 0}},
            })  # fmt: skip
            for key, value in measured_run(config, name).items():
                figures[f"{name}.{key}"] = value
        figures["segment_rows"] = args.segment_rows
    finally:
        ray.shutdown()
    write_report("segments", figures, args.out, device="cpu", args=vars(args))


if __name__ == "__main__":
    main()
