"""Shared fixtures: the project's tiny checkpoint and sample data, built once per session."""

from __future__ import annotations

import os

import pytest

# No hub access here; and keep vLLM's CPU KV cache small.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    from jobs.make_tiny_model import write_tiny_checkpoint

    return str(write_tiny_checkpoint(tmp_path_factory.mktemp("tiny-phi4mm"), dynamic_hd=1))


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model)
