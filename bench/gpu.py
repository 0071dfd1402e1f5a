"""The pipeline against the plain vLLM script and the engine alone, on the same rows, engine and sampling.

    python -m bench.gpu [--rows N] [--profile cuda|cpu] [--modes plain,pipeline,engine] [--work DIR]
    python -m bench.gpu --rows 10000 --plain-chunk-rows 1000   # a plain script that fits in host memory
    python -m bench.gpu --modes pipeline,pipeline-transformers   # vLLM against transformers, both pipelined

One command on a GPU machine: builds a mixed dataset of distinct rows (``bench.dataset``: photos up to
12 MP, 5-60 s speech in several formats, text, image+audio; no two rows share media bytes, so no cache
flatters anyone) and a checkpoint (full-size Phi-4-mm architecture with random weights and adapters of
the released shapes on ``cuda``, the tiny one on ``cpu``), then runs each side in a fresh process
(``bench.gpu_run``): (a) the pipeline through ``jobs.run``, (b) the plain vLLM script a user would write,
(c) the engine alone on inputs prepared beforehand; and (d) ``pipeline-transformers``: the pipeline with
``engine.backend: transformers`` on the same model in transformers' layout (``jobs.transformers_model``),
to show what each engine costs. Meanwhile it samples the GPU (nvidia-smi), the
host's CPU (/proc/stat) and memory. Reports rows/s and generated tokens/s end to end and in steady state
(engine up to last row), engine start, the GPU's busy fraction after the engine is up, CPU cores used per
GPU and peak memory; writes ``bench/results/gpu-<profile>-<host>.json`` and a PNG beside it.

The ``cpu`` profile is the same comparison on vLLM's CPU backend (tiny model, audio+text rows, the demo's
engine settings), where "GPU busy" is not measured.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import yaml

from bench.report import RESULTS, write_report

PROFILES = {
    # the H200 run: full-size architecture, LoRA on, bf16, long generations (ignore_eos keeps lengths equal)
    "cuda": {
        "rows": 10_000,
        "mix": None,
        "lora_cost": 256,
        "job": {
            "model": {"load_format": "dummy", "use_lora": True},
            "engine": {"dtype": "bfloat16", "max_model_len": 8192, "max_num_seqs": 128,
                       "max_num_batched_tokens": 16384, "dynamic_hd": 16, "gpu_memory_utilization": 0.85,
                       # FlashInfer's sampler JIT-builds for minutes on a fresh machine; greedy needs none
                       "env": {"VLLM_USE_FLASHINFER_SAMPLER": "0"}},
            "sampling": {"max_tokens": 128, "ignore_eos": True},
            "resources": {"preprocess": {"concurrency": 8, "batch_size": 16, "num_cpus": 1},
                          "generate": {"concurrency": 1, "batch_size": 32, "num_cpus": 2, "num_gpus": 1,
                                       "concurrent_batches": 8}},
        },
    },
    # this 2-core machine: the demo's settings, audio+text rows
    "cpu": {
        "rows": 200,
        "mix": "audio=0.5,text=0.5",
        "lora_cost": 0,
        "job": {
            "model": {"load_format": "dummy", "use_lora": True},
            "engine": {"dtype": "float32", "max_model_len": 2048, "max_num_seqs": 16, "dynamic_hd": 1,
                       "enforce_eager": True, "env": {"VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1"}},
            "sampling": {"max_tokens": 16, "ignore_eos": True},
            "resources": {"io_num_cpus": 0.25, "preprocess": {"concurrency": 1, "batch_size": 8, "num_cpus": 0.5},
                          "generate": {"concurrency": 1, "batch_size": 8, "num_cpus": 0.5, "num_gpus": 0,
                                       "concurrent_batches": 2}},
        },
    },
}  # fmt: skip


class Monitor:
    """Samples the GPU (utilization %, memory) and the host (CPU cores busy, memory used) with wall-clock
    stamps, so any window of a run can be summarised afterwards."""

    def __init__(self, gpu: bool):
        self.gpu_samples: list[tuple[float, float, float]] = []  # (time, util %, memory MiB)
        self.host_samples: list[tuple[float, float, float]] = []  # (time, cores busy, memory GiB used)
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._host, daemon=True)]
        self._smi = None
        if gpu:
            cmd = ["nvidia-smi", "--query-gpu=utilization.gpu,memory.used", "--format=csv,noheader,nounits",
                   "-lms", "200"]  # fmt: skip
            self._smi = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
            self._threads.append(threading.Thread(target=self._gpu, daemon=True))
        for t in self._threads:
            t.start()

    def _gpu(self) -> None:
        for line in self._smi.stdout:
            util, mem = (float(v) for v in line.split(",")[:2])  # first GPU's line
            self.gpu_samples.append((time.time(), util, mem))

    def _host(self) -> None:
        hz = os.sysconf("SC_CLK_TCK")
        prev = None
        while not self._stop.wait(0.5):
            fields = [int(v) for v in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
            busy = sum(fields) - fields[3] - fields[4]  # all but idle and iowait
            mem = {
                k: int(v.split()[0])
                for k, v in (ln.split(":") for ln in Path("/proc/meminfo").read_text().splitlines())
            }
            used_gib = (mem["MemTotal"] - mem["MemAvailable"]) / 2**20
            now = time.time()
            if prev:
                self.host_samples.append((now, (busy - prev[1]) / hz / (now - prev[0]), used_gib))
            prev = (now, busy)

    def stop(self) -> None:
        self._stop.set()
        if self._smi:
            self._smi.terminate()

    @staticmethod
    def window(samples, t0: float, t1: float, column: int) -> list[float]:
        return [s[column] for s in samples if t0 <= s[0] <= t1]


def _mean(values: list[float]) -> float | None:
    return round(sum(values) / len(values), 3) if values else None


def build_inputs(
    profile: str, rows: int, work: Path, seed: int, transformers: bool = False
) -> tuple[Path, Path]:
    """The dataset and checkpoint under ``work``, built once: later invocations (one side each) reuse them.
    ``transformers``: also the same model in transformers' layout (``transformers_checkpoint``)."""
    from bench.dataset import build_dataset

    data, model = work / "data", work / f"model-{profile}"
    if not data.exists():
        build_dataset(data, rows=rows, seed=seed, mix=PROFILES[profile]["mix"])
    hf_model = transformers_checkpoint(model)
    if transformers and not (hf_model / "config.json").exists():
        from jobs import transformers_model

        if profile == "cuda":
            transformers_model.write_full_size_transformers_checkpoint(hf_model)
        else:
            transformers_model.write_tiny_transformers_checkpoint(hf_model)
    if not (model / "config.json").exists():
        if profile == "cuda":
            from jobs.full_size_model import write_full_size_checkpoint

            write_full_size_checkpoint(model)
        else:
            from jobs.make_tiny_model import write_tiny_checkpoint

            write_tiny_checkpoint(model, dynamic_hd=1)
    return data, model


# Sides beyond the three: the pipeline with two engines sharing each GPU (each takes half of it), so one
# engine's kernels can run while the other is between steps on the CPU.
VARIANTS = {
    "pipeline-shared": {
        # each engine's KV cache set outright (18 GiB: ~147k tokens of Phi-4-mm), or the two size theirs
        # from what the other left free while both profile (schemas.job)
        "engine": {"gpu_memory_utilization": 0.42, "kv_cache_memory_gib": 18},
        "resources": {"generate": {"concurrency": 2, "num_gpus": 0.5}},
    },
    # The pipeline without adapters on the same rows: what LoRA routing costs the pipeline.
    "pipeline-nolora": {"model": {"use_lora": False}},
    # The pipeline with transformers' Phi4MultimodalForCausalLM instead of vLLM (same rows, sampling, LoRA).
    "pipeline-transformers": {"engine": {"backend": "transformers"}},
}
SIDES = ["plain", "pipeline", "pipeline-shared", "pipeline-nolora", "pipeline-transformers", "engine"]


def transformers_checkpoint(model: Path) -> Path:
    """Where the transformers-layout copy of ``model`` lives (written by ``build_inputs``)."""
    return model.with_name(f"{model.name}-transformers")


def merge(base: dict, over: dict) -> dict:
    """``base`` with ``over``'s values, nested dicts merged key by key."""
    return {
        k: merge(base[k], v) if isinstance(v, dict) and k in base else v for k, v in {**base, **over}.items()
    }


def write_job(profile: str, name: str, over: dict, data: Path, model: Path, work: Path, cache: str) -> Path:
    """``work/config-<name>.yaml``: the profile's job with ``over`` merged in, on this dataset and
    checkpoint, and on ``cuda`` the compile cache ``work/compile-cache-<cache>``."""
    job = merge(PROFILES[profile]["job"], over)
    job["input"] = {"path": str(data)}
    job["output"] = {"path": str(work / f"out-{name}"), "mode": "overwrite"}
    job["model"]["path"] = str(model)
    if profile == "cuda":
        job["engine"]["compile_cache_dir"] = str(work / f"compile-cache-{cache}")
    path = work / f"config-{name}.yaml"
    path.write_text(yaml.safe_dump(job))
    return path


def write_config(profile: str, mode: str, data: Path, model: Path, work: Path) -> Path:
    over = VARIANTS.get(mode, {})
    transformers = over.get("engine", {}).get("backend") == "transformers"
    # Every side starts on a cache of its own (cold on a fresh work dir), so no side's start is flattered
    # by graphs another side compiled; the engine alone reuses the pipeline's on purpose.
    cache = "pipeline" if mode == "engine" else mode
    return write_job(
        profile, mode, over, data, transformers_checkpoint(model) if transformers else model, work, cache
    )


def side_env(config: Path) -> dict[str, str]:
    """The environment a side runs in: this one's, plus the job's compile caches and ``engine.env``."""
    from pipelines.phi4mm import compile_cache_env
    from schemas.job import JobConfig

    engine = JobConfig.from_yaml(config).engine
    return {**os.environ, **compile_cache_env(engine.compile_cache_dir), **engine.env}


def run_side(
    mode: str, config: Path, work: Path, monitor: Monitor, lora_cost: int, plain_chunk_rows: int = 0
) -> dict:
    """One side in a fresh process, with the engine's environment. Its figures (from its own marks and the
    monitor's samples) and samples go to ``work/side-<mode>.json``, so sides run in separate invocations
    (one device call each) make one report."""
    env = side_env(config)
    result_path = work / f"result-{mode}.json"
    runner = mode.split("-")[0]  # pipeline-shared is the pipeline with another config
    cmd = [
        sys.executable,
        "-m",
        "bench.gpu_run",
        runner,
        str(config),
        str(result_path),
        "--lora-cost",
        str(lora_cost),
        "--chunk-rows",
        str(plain_chunk_rows),
    ]
    with open(work / f"log-{mode}.txt", "w") as log:
        subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, check=True)
    r = json.loads(result_path.read_text())
    m = r.pop("marks")
    start, up, done = m["start"], m["engine_up"], m["done"]
    steady_end = m.get("generated", done)
    base_mem = next((s[2] for s in reversed(monitor.host_samples) if s[0] <= start), 0.0)
    figures = {
        "rows": r["rows"],
        "ok_rows": r["ok_rows"],
        "end_to_end_s": round(done - start, 2),
        "rows_per_s": round(r["rows"] / (done - start), 3),
        "gen_tok_per_s": round(r["completion_tokens"] / (done - start), 1),
        "engine_up_after_s": round(up - start, 2),
        "engine_start_s": r["engine_start_s"],
        "steady.rows_per_s": round(r["ok_rows"] / (steady_end - up), 3),
        "steady.gen_tok_per_s": round(r["completion_tokens"] / (steady_end - up), 1),
        "gpu_busy_after_up": _mean([u / 100 for u in Monitor.window(monitor.gpu_samples, up, steady_end, 1)]),
        "cpu_cores_used": _mean(Monitor.window(monitor.host_samples, start, done, 1)),
        "host_mem_peak_increase_gib": round(max(Monitor.window(monitor.host_samples, start, done, 2), default=0) - base_mem, 2),
        "gpu_mem_peak_gib": round(max(Monitor.window(monitor.gpu_samples, start, done, 2), default=0) / 1024, 2),
        **{k: v for k, v in r.items() if k not in ("mode", "rows", "ok_rows")},
        "marks": {k: round(v - start, 2) for k, v in m.items()},
    }  # fmt: skip
    side = {
        "figures": figures,
        "samples": {
            "gpu": [(round(t - start, 2), u) for t, u, _ in monitor.gpu_samples if start <= t <= done],
            "host": [(round(t - start, 2), c) for t, c, _ in monitor.host_samples if start <= t <= done],
        },
    }
    (work / f"side-{mode}.json").write_text(json.dumps(side))
    return side


def ratios(sides: dict) -> dict:
    out = {}
    if "pipeline" in sides and "pipeline-nolora" in sides:  # below 1: what LoRA costs
        for k in ("rows_per_s", "steady.rows_per_s"):
            out[f"pipeline_lora_over_nolora.{k}"] = round(
                sides["pipeline"][k] / sides["pipeline-nolora"][k], 3
            )
    if "pipeline" in sides and "pipeline-transformers" in sides:  # above 1: transformers is faster
        p, t = sides["pipeline"], sides["pipeline-transformers"]
        for k in ("rows_per_s", "steady.rows_per_s", "steady.gen_tok_per_s"):
            out[f"transformers_over_vllm.{k}"] = round(t[k] / p[k], 3)
        out["transformers_over_vllm.engine_up"] = round(p["engine_up_after_s"] / t["engine_up_after_s"], 3)
    for name in (s for s in sides if s.startswith("pipeline") and s != "pipeline-nolora"):
        p = sides[name]
        if "plain" in sides:
            q = sides["plain"]
            out[f"{name}_over_plain.end_to_end"] = round(p["rows_per_s"] / q["rows_per_s"], 3)
            out[f"{name}_over_plain.steady"] = round(p["steady.rows_per_s"] / q["steady.rows_per_s"], 3)
            out[f"{name}_over_plain.engine_up"] = round(q["engine_up_after_s"] / p["engine_up_after_s"], 3)
        if "engine" in sides:
            out[f"{name}_over_engine.steady"] = round(
                p["steady.rows_per_s"] / sides["engine"]["steady.rows_per_s"], 3
            )
    return out


def plot(sides: dict, path: Path) -> None:
    """GPU busy (or host CPU cores on the cpu profile) over each side's run, and the rows/s bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_b) = plt.subplots(1, 2, figsize=(13, 4.5))
    gpu = any(side["samples"]["gpu"] for side in sides.values())
    for mode, side in sides.items():
        pts = side["samples"]["gpu" if gpu else "host"]
        (line,) = ax_t.plot([p[0] for p in pts], [p[1] for p in pts], lw=0.8, label=mode)
        ax_t.axvline(side["figures"]["engine_up_after_s"], color=line.get_color(), ls="--", lw=0.8)
    ax_t.set(
        xlabel="s since start (dashed: engine up)",
        ylabel="GPU utilization %" if gpu else "host CPU cores busy",
    )
    ax_t.legend()
    names = list(sides)
    x = range(len(names))
    figures = {n: sides[n]["figures"] for n in names}
    ax_b.bar([i - 0.2 for i in x], [figures[n]["rows_per_s"] for n in names], 0.4, label="end to end")
    ax_b.bar(
        [i + 0.2 for i in x], [figures[n]["steady.rows_per_s"] for n in names], 0.4, label="steady state"
    )
    ax_b.set_xticks(list(x), names)
    ax_b.set(ylabel="rows/s")
    ax_b.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--profile", choices=list(PROFILES), help="default: cuda when nvidia-smi works, else cpu"
    )
    parser.add_argument("--rows", type=int, help="rows in the dataset (profile default: cuda 10000, cpu 200)")
    parser.add_argument(
        "--modes",
        default="plain,pipeline,engine",
        help=f"sides to run, in this order, of {SIDES} ('' to only report)",
    )
    parser.add_argument("--work", help="scratch directory (dataset, checkpoint, outputs, logs); kept")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lora-cost", type=int, help="engine side: rows rerun with and without adapters")
    parser.add_argument("--out", help="result JSON (default bench/results/gpu-<profile>-<host>.json)")
    parser.add_argument(
        "--plain-chunk-rows",
        type=int,
        default=0,
        help="plain side: start the engine, then decode and generate this many rows at a time (default 0: "
        "decode every row first, which holds them all in memory: ~23 GiB per 1,000 rows of the cuda mix)",
    )
    args = parser.parse_args(argv)
    profile = args.profile or ("cuda" if _has_gpu() else "cpu")
    spec = PROFILES[profile]
    work = Path(args.work or tempfile.mkdtemp(prefix="bench-gpu-"))
    work.mkdir(parents=True, exist_ok=True)
    modes = [m for m in args.modes.split(",") if m]
    if modes:
        t = time.perf_counter()
        transformers = any(
            VARIANTS.get(m, {}).get("engine", {}).get("backend") == "transformers" for m in modes
        )
        data, model = build_inputs(profile, args.rows or spec["rows"], work, args.seed, transformers)
        print(f"inputs ready in {time.perf_counter() - t:.0f} s: {data}, {model}", flush=True)
        monitor = Monitor(gpu=profile == "cuda")
        time.sleep(1.5)  # a few samples before the first side: its memory baseline
        lora_cost = spec["lora_cost"] if args.lora_cost is None else args.lora_cost
        try:
            for mode in modes:
                config = write_config(profile, mode, data, model, work)
                side = run_side(mode, config, work, monitor, lora_cost, args.plain_chunk_rows)
                print(f"{mode}: {json.dumps(side['figures'])}", flush=True)
        finally:
            monitor.stop()
    sides = {
        m: json.loads((work / f"side-{m}.json").read_text())
        for m in SIDES
        if (work / f"side-{m}.json").exists()
    }
    per_side = {m: side["figures"] for m, side in sides.items()}
    figures = {f"{m}.{k}": v for m, f in per_side.items() for k, v in f.items() if k != "marks"}
    figures.update(ratios(per_side))
    out = Path(args.out) if args.out else RESULTS / f"gpu-{profile}-{os.uname().nodename}.json"
    marks = {m: f["marks"] for m, f in per_side.items()}
    write_report(
        "gpu", figures, str(out), profile=profile, device=_device(), settings=spec["job"], marks=marks
    )
    try:
        plot(sides, out.with_suffix(".png"))
        print(f"wrote {out.with_suffix('.png')}")
    except ImportError:
        print("matplotlib missing: no PNG")


def _device() -> str:
    try:
        return subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True).stdout.strip() or "cpu"
    except FileNotFoundError:
        return "cpu"


def _has_gpu() -> bool:
    try:
        return subprocess.run(["nvidia-smi", "-L"], capture_output=True).returncode == 0
    except FileNotFoundError:
        return False


if __name__ == "__main__":
    main()
