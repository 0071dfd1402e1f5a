"""On a CUDA device: what the CPU tier proves on vLLM's CPU backend, again on the GPU kernels.

The tiny checkpoint with vLLM's full, hard-coded SigLIP tower; eager mode to start fast (the benchmark,
bench/gpu.py, runs the compiled engine at full size)."""

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from actors.generate import GenerateRows
from actors.preprocess import PreprocessRows
from jobs.make_sample_data import SCHEMA, sample_rows
from pipelines.phi4mm import run_pipeline
from tests.helpers import MEDIA, assert_adapters_apply_per_row_in_shared_steps, cuda_sections, make_config

SAMPLE_ERRORS = {"broken-truncated-jpeg": "IMAGE_DECODE_ERROR", "broken-empty-row": "MISSING_INPUT"}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "in.parquet"
    pq.write_table(pa.Table.from_pylist(sample_rows(), schema=SCHEMA), path)
    return path


@pytest.fixture(scope="module")
def config(tiny_model, dataset, tmp_path_factory):
    return make_config(
        tiny_model,
        tmp_path_factory.mktemp("gpu"),
        input={"path": str(dataset), "media_root": str(MEDIA)},
        **cuda_sections(0.3, dynamic_hd=2),
    )


@pytest.fixture(scope="module")
def generate(config):
    return GenerateRows(config, run_id="cuda")


def test_engine_runs_on_cuda_and_counts_tokens_as_the_cpu_stage(config, generate, dataset):
    from vllm.platforms import current_platform

    assert current_platform.is_cuda()
    prepared = PreprocessRows(config)(pq.read_table(dataset))
    out = {r["id"]: r for r in generate(prepared).to_pylist()}
    expected = {r["id"]: r for r in prepared.to_pylist()}
    assert {k: r["error_code"] for k, r in out.items() if r["status"] == "error"} == SAMPLE_ERRORS
    ok = [k for k, r in out.items() if r["status"] == "ok"]
    assert len(ok) == len(out) - len(SAMPLE_ERRORS)
    assert all(out[k]["prompt_tokens"] == expected[k]["prompt_tokens"] for k in ok)
    assert all(out[k]["completion_tokens"] == config.sampling.max_tokens for k in ok)


def test_adapters_apply_per_row_in_shared_steps_on_cuda(config, generate):
    # async scheduling, on by default on CUDA, adds one step of look-ahead
    assert_adapters_apply_per_row_in_shared_steps(generate.engine, max_steps=config.sampling.max_tokens + 1)


def test_pipeline_on_cuda_one_row_per_input(cuda_ray, config, dataset):
    summary = run_pipeline(config, run_id="cuda-pipeline")
    out = pq.read_table(config.output.path).to_pylist()
    assert summary["audit"]["ok"] and len(out) == pq.read_metadata(dataset).num_rows
    assert {r["id"]: r["error_code"] for r in out if r["status"] == "error"} == SAMPLE_ERRORS
    (engine,) = summary["engines"].values()
    assert engine["requests"] >= summary["status"]["ok"]


def test_segments_on_cuda_each_engine_starts_once_the_last_freed_the_gpu(cuda_ray, tiny_model, tmp_path):
    """``resources.segment_rows``: each segment is a Ray Data execution with GPU actors of its own. Each
    engine here asks for more than half of the GPU memory still free (earlier tests' engines in this
    process may hold some), so a segment whose engine started before the previous segment's had let go
    of the GPU could not start; every row is answered once."""
    import torch

    free, total = torch.cuda.mem_get_info()
    share = round(0.6 * free / total, 3)  # one engine fits, two at once do not
    assert share * total > 4 * 2**30, (
        f"only {free / 2**30:.1f} GiB of the GPU free; the tiny engine needs ~4 GiB"
    )
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    ids = {"0.parquet": ["a", "b"], "1.parquet": ["c", "d", "e"]}
    for name, rows in ids.items():
        pq.write_table(pa.table({"id": rows, "prompt": [f"Say {i}." for i in rows]}), inbox / name)
    sections = cuda_sections(share)
    sections["resources"]["segment_rows"] = 2
    config = make_config(
        tiny_model,
        tmp_path,
        input={"path": str(inbox), "columns": {"image": None, "audio": None}},
        sampling={"max_tokens": 2},
        **sections,
    )
    summary = run_pipeline(config, run_id="cuda-segments")
    assert summary["audit"]["ok"] and summary["status"] == {"ok": 5}
    assert sorted(e["requests"] for e in summary["engines"].values()) == [2, 3]  # one engine per segment
    assert sorted(pq.read_table(config.output.path).column("id").to_pylist()) == list("abcde")
