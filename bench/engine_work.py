"""The engine's own work per row: its settings one lever at a time on the same prepared rows, and a profile.

    python -m bench.engine_work [--profile cuda|cpu] [--rows N] [--arms base,sync,tokens-32k,...]
                                [--torch-profile-steps N] [--work DIR] [--out JSON]

Rows: ``bench.dataset``'s mix of distinct rows (``bench.gpu.build_inputs``: photos up to 12 MP, 5-60 s
speech in four formats, text, image+audio; the cuda profile's full-size architecture with random weights and
adapters of the released shapes, LoRA on, bf16, dynamic_hd 16, 128 new tokens with ignore_eos). Every row
goes through the CPU stage once (``bench.gpu_run.prepare_all``) and is cached in the work directory, so
every arm gets the same prepared inputs and no arm pays for preparation.

Each arm runs in a fresh process (its engine's memory its own; compile caches shared, so only the first arm
compiles cold): the engine as the GPU actor builds it (``actors.engines.vllm.engine.engine_kwargs`` with the
arm's settings) is handed every row at once and stepped to the end in one thread, as the actor's loop does.
Per arm: rows/s and tokens/s from the first request to the last answer, GPU busy (nvidia-smi), and the
engine's useful-work figures (``actors.engines.vllm.stats``: KV cache size, running against waiting,
preemptions, cache hits, tokens per second of step). The FLOP estimate counts 2 x parameters per token for
the language model (prompt and generated tokens) and per encoder input for each encoder (the vision tower's
patches, the audio encoder's frames), against the card's dense bf16 rate: an estimate, not a count.

With ``--torch-profile-steps N`` the first arm also runs torch.profiler over N steps once a quarter of its
rows are answered, and sorts the GPU's kernel time by where it was launched (vLLM's profiling scopes and the
model's encoder scopes) and, in the language model, by kernel kind: the profile table.

Writes ``bench/results/engine-work-<profile>-<host>.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from bench.gpu import PROFILES, Monitor, _device, _has_gpu, _mean, build_inputs, side_env, write_job
from bench.report import RESULTS, write_report

# One lever each against "base" (the cuda profile's settings, which the pipeline runs with).
ARMS: dict[str, dict] = {
    "base": {},
    "sync": {"engine": {"async_scheduling": False}},
    "tokens-32k": {"engine": {"max_num_batched_tokens": 32768}},
    "tokens-64k": {"engine": {"max_num_batched_tokens": 65536}},
    "seqs-256": {"engine": {"max_num_seqs": 256}},
    "seqs-64": {"engine": {"max_num_seqs": 64}},
    "grouped": {"order": "grouped"},  # rows handed over sorted by adapter and modality
    "nolora": {"model": {"use_lora": False}},
}

# Dense bf16 tensor-core rate by card, FLOP/s (NVIDIA's figures without sparsity).
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12}

# Where a kernel was launched from, innermost scope first; the label it is counted under.
SCOPES = {
    "phi4mm: image encoder": "vision encoder",
    "phi4mm: audio encoder": "audio encoder",
    "gpu_model_runner: sample": "sampling",
    "gpu_model_runner: forward": "language model",
    "gpu_model_runner: preprocess": "input preparation",
    "gpu_model_runner: postprocess": "output handling",
}
KERNEL_KINDS = (  # in the language model, by kernel name
    ("LoRA kernels", ("lora", "punica", "sgmv", "bgmv")),
    ("attention", ("flash", "attn", "fmha", "paged")),
    ("GEMM", ("gemm", "nvjet", "cutlass", "xmma", "cublas", "matmul", "wgmma")),
)


def kernel_kind(name: str) -> str:
    low = name.lower()
    return next((kind for kind, keys in KERNEL_KINDS if any(k in low for k in keys)), "other kernels")


def profile_table(events, wall_us: float) -> dict:
    """GPU kernel time by scope (and by kernel kind inside the language model), as shares of the profiled
    wall time; what no kernel filled is the GPU idle between and around kernels."""
    spent: Counter = Counter()
    for evt in events:
        kernels = getattr(evt, "kernels", None)
        if not kernels:
            continue
        label, parent = "other", evt
        while parent is not None:
            if parent.name in SCOPES:
                label = SCOPES[parent.name]
                break
            parent = parent.cpu_parent
        for k in kernels:
            key = f"language model: {kernel_kind(k.name)}" if label == "language model" else label
            spent[key] += k.duration
    busy = sum(spent.values())
    table = {k: round(v / wall_us, 4) for k, v in spent.most_common()}
    table["GPU idle (host time between and around kernels)"] = round(max(1 - busy / wall_us, 0.0), 4)
    return table


def parameter_counts(model) -> dict:
    """Parameters of the language model's layers, its vocabulary matrices and each encoder (vLLM's Phi4MM
    names; LoRA weights are not parameters there and are not counted)."""
    counts: Counter = Counter()
    for name, p in model.named_parameters():
        if name.startswith("vision_encoder."):
            part = "vision"
        elif name.startswith("embed_tokens_extend."):
            part = "audio"
        elif "embed_tokens" in name or name.startswith("lm_head"):
            part = "vocab"
        else:
            part = "language"
        counts[part] += p.numel()
    return dict(counts)


def flop_estimate(params: dict, tokens: dict, crops: int, audio_frames: int) -> float:
    """2 x parameters per position: the language model's layers for every prompt and generated token, the
    vocabulary projection for generated tokens only, the vision tower for its patches (1,024 per 448 px
    crop: SigLIP's 14 px patches) and the audio encoder for its frames after its 8x subsampling. Attention
    over the context and LoRA are left out, so the estimate is low."""
    lm = 2 * params.get("language", 0) * (tokens["prompt"] + tokens["completion"])
    lm += 2 * params.get("vocab", 0) * tokens["completion"]
    vision = 2 * params.get("vision", 0) * crops * 1024
    audio = 2 * params.get("audio", 0) * audio_frames / 8
    return lm + vision + audio


def _requests(table, order: str):
    from actors.engines.contract import EngineRequest
    from actors.generate import prepared_rows

    prepared = [row for row in prepared_rows(table) if row["status"] == "ok"]
    requests = [r for row in prepared for r in EngineRequest.from_prepared(row)]
    if order == "grouped":
        requests.sort(key=lambda r: (str(r.adapter), bool(r.images), bool(r.audios)))
    return requests


def run_arm(name: str, config_path: Path, prepared: Path, profile_steps: int, result: Path) -> None:
    """One arm, in this process: the engine, every row at once, stepped to the end."""
    import pyarrow as pa

    from actors.engines.vllm.engine import engine_kwargs, engine_prompt
    from actors.engines.vllm.plugin import register
    from actors.engines.vllm.stats import attach
    from actors.generate import run_init_hook
    from bench.plain_vllm import lora_requests, sampling_params
    from schemas.job import JobConfig

    config = JobConfig.from_yaml(config_path)
    with pa.memory_map(str(prepared)) as source:
        table = pa.ipc.open_file(source).read_all()
    requests = _requests(table, ARMS[name].get("order", "as read"))
    crops = sum(len(im["mask"]) // (32 * 32) for r in requests for im in r.images)
    audio_frames = sum(a["frames"] for r in requests for a in r.audios)
    run_init_hook(config.engine.init_hook)
    register()
    from vllm import LLM

    started = time.time()
    llm = LLM(**engine_kwargs(config))
    up = time.time()
    engine = llm.llm_engine
    work = attach(engine)
    params, loras = sampling_params(config), lora_requests(config)
    try:
        counts = llm.apply_model(parameter_counts)[0]
    except Exception as e:  # an executor outside this process cannot hand the model over
        counts = {"error": f"{type(e).__name__}: {e}"}
    t0 = time.perf_counter()
    for i, r in enumerate(requests):
        engine.add_request(str(i), engine_prompt(r), params, lora_request=loras.get(r.adapter))
    done, prompt_tokens, completion_tokens, profile = 0, 0, 0, None
    profiler, profiled = None, 0
    while engine.has_unfinished_requests():
        if profile_steps and profiler is None and done >= len(requests) // 4:
            profiler = _start_profiler()
            p0 = time.perf_counter()
        s = time.perf_counter()
        outputs = engine.step()
        work.step_timed(time.perf_counter() - s)
        if profiler is not None and profile is None:
            profiled += 1
            if profiled == profile_steps:
                _sync()
                wall_us = (time.perf_counter() - p0) * 1e6
                profiler.stop()
                profile = profile_table(profiler.events(), wall_us)
                profile["steps"], profile["wall_s"] = profiled, round(wall_us / 1e6, 3)
        for out in outputs:
            if out.finished:
                done += 1
                prompt_tokens += len(out.prompt_token_ids)
                completion_tokens += len(out.outputs[0].token_ids)
    elapsed = time.perf_counter() - t0
    tokens = {"prompt": prompt_tokens, "completion": completion_tokens}
    figures = {
        "rows": done,
        "engine_start_s": round(up - started, 2),
        "rows_per_s": round(done / elapsed, 3),
        "gen_tok_per_s": round(completion_tokens / elapsed, 1),
        "prompt_tok_per_s": round(prompt_tokens / elapsed, 1),
        "generate_s": round(elapsed, 2),
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "crops": crops,
        "audio_frames": audio_frames,
        "params": counts,
        "work": work.figures(elapsed),
        "flop": flop_estimate(counts, tokens, crops, audio_frames) if "error" not in counts else None,
    }
    if profile is not None:
        figures["profile"] = profile
    result.write_text(
        json.dumps({"marks": {"start": started, "up": up, "generated": up + elapsed}, **figures})
    )


def _start_profiler():
    import torch

    activities = [torch.profiler.ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    profiler = torch.profiler.profile(activities=activities)
    profiler.start()
    return profiler


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def prepare_once(config_path: Path, work: Path) -> Path:
    """Every row through the CPU stage once, kept as an Arrow file every arm maps."""
    import pyarrow as pa

    from bench.gpu_run import prepare_all
    from schemas.job import JobConfig

    path = work / "prepared.arrow"
    if not path.exists():
        table = prepare_all(JobConfig.from_yaml(config_path))
        with pa.OSFile(str(path) + ".tmp", "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
            writer.write_table(table)
        os.replace(str(path) + ".tmp", path)
    return path


def write_arm_config(profile: str, arm: str, data: Path, model: Path, work: Path) -> Path:
    """An arm's job: the profile's with the arm's engine settings; every arm shares one compile cache, so
    only the first compiles cold."""
    over = {k: v for k, v in ARMS[arm].items() if k != "order"}
    return write_job(profile, arm, over, data, model, work, "engine-work")


def summarize(r: dict, monitor: Monitor, device: str) -> dict:
    m = r.pop("marks")
    out = {k: v for k, v in r.items() if k not in ("work", "profile", "params")}
    out.update({f"work.{k}": v for k, v in r["work"].items()})
    out["gpu_busy"] = _mean(
        [u / 100 for u in Monitor.window(monitor.gpu_samples, m["up"], m["generated"], 1)]
    )
    peak = next((v for k, v in PEAK_BF16.items() if k in device), None)
    if r.get("flop") and peak:
        out["flop_share_of_peak"] = round(r["flop"] / r["generate_s"] / peak, 3)
    if "profile" in r:
        out.update({f"profile.{k}": v for k, v in r["profile"].items()})
    out["params"] = r["params"]
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", choices=list(PROFILES), help="default: cuda when nvidia-smi works")
    parser.add_argument("--rows", type=int, default=600, help="rows in the dataset (default 600)")
    parser.add_argument("--arms", default="base,sync,tokens-32k,seqs-256,grouped", help=f"of {list(ARMS)}")
    parser.add_argument("--torch-profile-steps", type=int, default=0, help="profile the first arm's steps")
    parser.add_argument("--work", help="scratch directory (dataset, checkpoint, prepared rows); kept")
    parser.add_argument("--out", help="result JSON (default bench/results/engine-work-<profile>-<host>.json)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--run-arm", help=argparse.SUPPRESS)  # internal: one arm in this process
    args = parser.parse_args(argv)
    work = Path(args.work or tempfile.mkdtemp(prefix="bench-engine-work-"))
    if args.run_arm:
        run_arm(args.run_arm, work / f"config-{args.run_arm}.yaml", work / "prepared.arrow",
                args.torch_profile_steps, work / f"arm-{args.run_arm}.json")  # fmt: skip
        return
    profile = args.profile or ("cuda" if _has_gpu() else "cpu")
    work.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    data, model = build_inputs(profile, args.rows, work, args.seed)
    prepare_once(write_arm_config(profile, "base", data, model, work), work)
    print(f"inputs prepared in {time.perf_counter() - t:.0f} s", flush=True)
    device = _device()
    out = Path(args.out) if args.out else RESULTS / f"engine-work-{profile}-{os.uname().nodename}.json"
    monitor = Monitor(gpu=profile == "cuda")
    arms: dict[str, dict] = {}
    try:
        for n, arm in enumerate(a for a in args.arms.split(",") if a):
            config = write_arm_config(profile, arm, data, model, work)
            env = side_env(config)
            # the engine in the arm's process, as in the GPU actor; vLLM's own profiler scopes (cheap unprofiled)
            env.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
            env["VLLM_CUSTOM_SCOPES_FOR_PROFILING"] = "1"
            steps = args.torch_profile_steps if n == 0 else 0
            cmd = [sys.executable, "-m", "bench.engine_work", "--run-arm", arm, "--work", str(work),
                   "--torch-profile-steps", str(steps)]  # fmt: skip
            with open(work / f"log-{arm}.txt", "w") as log:
                code = subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
            if code:
                print(f"{arm}: failed (exit {code}); see {work / f'log-{arm}.txt'}", flush=True)
                continue
            arms[arm] = summarize(json.loads((work / f"arm-{arm}.json").read_text()), monitor, device)
            print(f"{arm}: {json.dumps(arms[arm])}", flush=True)
            _write(
                arms, out, profile, device, args
            )  # after every arm: a cut-short run keeps what it measured
    finally:
        monitor.stop()
    _write(arms, out, profile, device, args, final=True)


def _write(arms: dict, out: Path, profile: str, device: str, args, final: bool = False) -> None:
    figures = {f"{arm}.{k}": v for arm, f in arms.items() for k, v in f.items() if k != "params"}
    if "base" in arms:
        base = arms["base"]["rows_per_s"]
        figures.update({f"{arm}.rows_per_s_over_base": round(f["rows_per_s"] / base, 3)
                        for arm, f in arms.items() if arm != "base"})  # fmt: skip
    context = dict(profile=profile, device=device, rows=args.rows, settings=PROFILES[profile]["job"],
                   arms={a: ARMS[a] for a in arms}, params=next((f["params"] for f in arms.values()), None))  # fmt: skip
    if final:
        write_report("engine-work", figures, str(out), **context)
    else:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"benchmark": "engine-work", **context, "figures": figures}, indent=1))


if __name__ == "__main__":
    main()
