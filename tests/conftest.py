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
def tiny_byte_model(tmp_path_factory) -> str:
    """The tiny checkpoint with a byte-level tokenizer, which spells any text: constrained decoding
    (structured outputs) has the tokens it needs (the word-level one cannot spell JSON or a choice)."""
    from jobs.make_tiny_model import write_byte_tokenizer, write_tiny_checkpoint

    out = write_tiny_checkpoint(tmp_path_factory.mktemp("tiny-phi4mm-bytes"), dynamic_hd=1)
    write_byte_tokenizer(out)
    return str(out)


@pytest.fixture(scope="session")
def tiny_transformers_byte_model(tmp_path_factory) -> str:
    """``tiny_transformers_model`` with the byte-level tokenizer of ``tiny_byte_model``."""
    from jobs.make_tiny_model import write_byte_tokenizer
    from jobs.transformers_model import write_tiny_transformers_checkpoint

    out = write_tiny_transformers_checkpoint(tmp_path_factory.mktemp("tiny-phi4mm-transformers-bytes"))
    write_byte_tokenizer(out)
    return str(out)


@pytest.fixture(scope="session")
def tiny_transformers_model(tmp_path_factory) -> str:
    """The same tiny model in transformers' layout (engine.backend: transformers), random weights saved."""
    from jobs.transformers_model import write_tiny_transformers_checkpoint

    return str(write_tiny_transformers_checkpoint(tmp_path_factory.mktemp("tiny-phi4mm-transformers")))


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model)


@pytest.fixture(scope="session")
def s3_endpoint():
    """An S3 endpoint for the session: ``PHI4MM_TEST_S3_ENDPOINT`` when set (a real store or MinIO; its
    credentials from the usual AWS environment variables), otherwise the project's own test server
    (tests/s3_server.py), started here, waited on until it answers, stopped after the session. Yields
    ``(endpoint, server)``; ``server`` is None for a real endpoint (fault tests skip there)."""
    real = os.environ.get("PHI4MM_TEST_S3_ENDPOINT")
    if real:
        yield real, None
        return
    from tests.s3_server import ACCESS_KEY, SECRET_KEY, S3Server

    saved = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION")}
    # As a user sets them: the SDK's environment chain, read by this process and the Ray workers it starts.
    os.environ.update(AWS_ACCESS_KEY_ID=ACCESS_KEY, AWS_SECRET_ACCESS_KEY=SECRET_KEY, AWS_REGION="us-east-1")
    with S3Server() as server:
        yield server.endpoint, server
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture
def s3(s3_endpoint):
    """A fresh bucket on the session's S3 endpoint: ``s3.url(key)``, ``s3.fs``, ``s3.server`` (or None)."""
    import uuid

    from tests.s3_server import S3Bucket

    bucket = S3Bucket(*s3_endpoint, name=f"phi4mm-test-{uuid.uuid4().hex[:12]}")
    yield bucket
    bucket.clean()
