"""The checkpoint and engine settings a benchmark that runs the stages in its own process uses: the tiny
checkpoint, eager, on the CPU here; on a CUDA device, a full-size checkpoint (``--full-size``) run as a
GPU job runs it."""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
from pathlib import Path

COMPILE_CACHE = Path(tempfile.gettempdir()) / "phi4mm-bench-compile-cache"


def on_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def tiny_checkpoint(backend: str) -> Path:
    """Write the tiny checkpoint for ``backend`` ("vllm" or "transformers"); vLLM set up to run in this
    process with a small KV cache."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    if backend == "vllm":
        from jobs.make_tiny_model import write_tiny_checkpoint

        return write_tiny_checkpoint(tempfile.mkdtemp(prefix="tiny-phi4mm-"))
    from jobs.transformers_model import write_tiny_transformers_checkpoint

    return write_tiny_transformers_checkpoint(tempfile.mkdtemp(prefix="tiny-phi4mm-"))


def bench_checkpoint(backend: str, full_size: str | None) -> Path:
    """The tiny checkpoint, or with ``full_size`` the released architecture (random weights, adapters of
    the released shapes) in that folder, written there unless it already holds one (benchmarks share it)."""
    if not full_size:
        return tiny_checkpoint(backend)
    if backend != "vllm":
        raise SystemExit("--full-size runs the vLLM backend (bench/gpu.py runs transformers at full size)")
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine core in this process
    out = Path(full_size)
    if not (out / "config.json").exists():
        from jobs.full_size_model import write_full_size_checkpoint

        write_full_size_checkpoint(out)
    return out


def engine_keys(backend: str, cuda: bool, **keys) -> dict:
    """A benchmark's engine section. On CUDA as a GPU job runs it: bf16, compiled with CUDA graphs,
    vLLM's own vision tower, compile caches under one folder (a second benchmark starts warm; they are
    set in this process's environment, which the engine reads). On the CPU: eager, float32 and the
    shrunken vision tower of the tiny model. ``keys`` (max_model_len, max_num_seqs, ...) are added."""
    if cuda:
        from pipelines.phi4mm import compile_cache_env

        os.environ.update({**compile_cache_env(str(COMPILE_CACHE)), "VLLM_USE_FLASHINFER_SAMPLER": "0"})
        return {"backend": backend, "dtype": "bfloat16", "enforce_eager": False, "gpu_memory_utilization": 0.85,
                "dynamic_hd": 16, **keys}  # fmt: skip
    vllm = backend == "vllm"
    return {"backend": backend, "dtype": "float32", "enforce_eager": True, "dynamic_hd": 1,
            "init_hook": "jobs.tiny_vision:shrink_siglip" if vllm else None, **keys}  # fmt: skip


def device_name(cuda: bool) -> str:
    if not cuda:
        return "cpu"
    import torch

    return f"cuda: {torch.cuda.get_device_name()}"


def add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    """The options every benchmark of an engine in this process takes: which backend, a full-size
    checkpoint for a GPU run, where the JSON goes."""
    parser.add_argument("--backend", choices=["vllm", "transformers"], default="vllm")
    parser.add_argument("--full-size", metavar="DIR", help="A full-size checkpoint's folder (GPU runs).")
    parser.add_argument(
        "--out", help="The JSON's path (default: bench/results/<benchmark>[-<backend>][-cuda]-<host>.json)."
    )


def engine_setup(benchmark: str, args: argparse.Namespace) -> tuple[bool, Path, str]:
    """(on CUDA, the checkpoint, the JSON's path) for ``add_engine_arguments``' options: a run of another
    backend or on a GPU gets a file of its own, not the default run's."""
    from bench.report import RESULTS

    cuda = on_cuda()
    kind = ("" if args.backend == "vllm" else f"-{args.backend}") + ("-cuda" if cuda else "")
    out = args.out or str(RESULTS / f"{benchmark}{kind}-{platform.node() or 'host'}.json")
    return cuda, bench_checkpoint(args.backend, args.full_size), out
