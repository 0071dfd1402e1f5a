"""The tiny checkpoint a CPU benchmark runs on, for either engine backend, in a fresh temporary folder."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


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
