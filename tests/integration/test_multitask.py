"""Several tasks per row on the tiny model, on each engine backend (the real vLLM CPU engine, then
transformers): jobs/configs/multitask.yaml, plus a task made from a column some rows lack, through the
stages in this process; the output written as a job writes it and read back with ``datasets``."""

from types import SimpleNamespace

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from actors.generate import GenerateRows
from actors.preprocess import PreprocessRows
from jobs.run import format_summary
from pipelines.phi4mm import output_shape, run_pipeline
from pipelines.validate import check_input_columns
from schemas.job import JobConfig
from schemas.multitask import TASK_PREFIX
from schemas.rows import MEDIA_STRUCT
from tests.helpers import MEDIA, REPO, make_config, tiny_overrides


@pytest.fixture(scope="module", params=["vllm", "transformers"])
def engine(request, tmp_path_factory):
    # the byte-level tokenizer's checkpoints (tests/conftest.py): constrained decoding can spell any choice
    if request.param == "vllm":
        model, sections = (
            request.getfixturevalue("tiny_byte_model"),
            {"engine": {"init_hook": "jobs.tiny_vision:shrink_siglip"}},
        )
    else:
        model = request.getfixturevalue("tiny_transformers_byte_model")
        sections = {"engine": {"backend": "transformers"}, "model": {"load_format": "auto"}}
    config = make_config(model, tmp_path_factory.mktemp("multitask"), **sections)
    return config, GenerateRows(config, run_id="multitask").engine


def _rows() -> pa.Table:
    fox, morning = ({"bytes": (MEDIA / n).read_bytes(), "path": n} for n in ("fox.wav", "morning.mp3"))
    rows = [
        {"id": "fox", "audio": fox, "title": "The fox"},
        {"id": "morning", "audio": morning, "title": None},  # the titled task cannot run on it
        {"id": "broken", "audio": {"bytes": b"not audio", "path": "x.wav"}, "title": "x"},
        {"id": "silent", "audio": None, "title": "y"},  # no audio: the audio tasks cannot run
    ]
    schema = pa.schema([("id", pa.string()), ("audio", MEDIA_STRUCT), ("title", pa.string())])
    return pa.Table.from_pylist(rows, schema=schema)


def test_multitask_yaml_runs_every_task_once_per_row(engine, tmp_path):
    import datasets

    base, shared = engine
    config = JobConfig.from_yaml(
        REPO / "jobs" / "configs" / "multitask.yaml",
        {
            **tiny_overrides(base, tmp_path),
            "tasks.titled": {"preset": "custom", "template": "Describe this clip called {title}.", "n": 2},
        },
    )
    names = list(config.tasks)
    table = _rows()
    check_input_columns(config, table.schema)  # the pre-run checks accept the example on such data
    prepared = PreprocessRows(config)(table)
    generated = GenerateRows(config, run_id="mt", engine_factory=lambda _: shared)(prepared)
    written = output_shape(config, SimpleNamespace(schema=table.schema)).apply(generated)
    pq.write_table(written, tmp_path / "part-0.parquet")
    read = datasets.load_dataset("parquet", data_files=str(tmp_path / "part-0.parquet"), split="train")
    assert set(names) <= set(read.features) and read.features["transcript"]["status"].dtype == "string"
    rows = {r["id"]: r for r in read}
    assert list(rows) == ["fox", "morning", "broken", "silent"]  # one output row per input row

    fox = rows["fox"]
    assert fox["status"] == "ok", fox["kind"]
    entries = {t["name"]: t for t in prepared.to_pylist()[0]["tasks"]}
    for name in names:
        task = fox[name]
        assert task["status"] == "ok" and isinstance(task["text"], str) and task["completion_tokens"] > 0
        assert (
            task["prompt_tokens"] == entries[name]["prompt_tokens"]
        )  # the CPU stage's count is the engine's
    assert fox["kind"]["text"] in ("speech", "music", "noise")  # constrained to the choice list
    assert len(fox["titled"]["samples"]) == 2 and fox["titled"]["samples"][0] == fox["titled"]["text"]
    assert fox["prompt_tokens"] == sum(fox[n]["prompt_tokens"] for n in names)

    morning = rows["morning"]  # the titled task's error does not fail the others
    assert morning["error_code"] == "TASKS_FAILED" and "titled (MISSING_INPUT)" in morning["error_message"]
    assert morning["titled"]["error_code"] == "MISSING_INPUT"
    assert all(morning[n]["status"] == "ok" for n in ("transcript", "french", "kind"))

    broken = rows["broken"]  # a media error is the row's, and every task's
    assert broken["error_code"] == "AUDIO_DECODE_ERROR"
    assert {broken[n]["error_code"] for n in names} == {"AUDIO_DECODE_ERROR"}

    silent = rows["silent"]  # the audio presets cannot run; the custom tasks read no media and run
    assert (
        silent["error_code"] == "TASKS_FAILED"
        and silent["titled"]["status"] == silent["kind"]["status"] == "ok"
    )
    assert {silent[n]["error_code"] for n in ("transcript", "french")} == {"MISSING_INPUT"}
    assert TASK_PREFIX + "transcript" in generated.column_names


def test_a_run_on_local_ray_counts_each_tasks_rows(tiny_model, tmp_path, local_ray):
    """Two custom templates on text rows through the whole pipeline (real Ray, real vLLM CPU): the written
    parts hold a struct column per task and the summary counts each task's rows by status."""
    import datasets

    rows = [{"id": f"r{i}", "title": f"Book {i}", "category": None if i == 3 else "novel"} for i in range(4)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "in.parquet")
    config = make_config(
        tiny_model, tmp_path, engine={"init_hook": "jobs.tiny_vision:shrink_siglip"},
        input={"path": str(tmp_path / "in.parquet"), "columns": {"image": None, "audio": None}},
        tasks={"blurb": {"preset": "custom", "template": "A blurb for {title}."},
               "shelf": {"preset": "custom", "template": "Where to shelve a {category}?"}},
    )  # fmt: skip
    summary = run_pipeline(config, run_id="multitask")
    assert summary["audit"]["ok"] and summary["rows_written"] == 4
    assert summary["tasks"] == {"blurb": {"ok": 4}, "shelf": {"MISSING_INPUT": 1, "ok": 3}}
    assert summary["error_codes"] == {"TASKS_FAILED": 1}
    assert "task shelf" in format_summary(summary) and "MISSING_INPUT 1" in format_summary(summary)
    ds = datasets.load_dataset("parquet", data_files=str(tmp_path / "out" / "part-*.parquet"), split="train")
    assert sorted(ds["id"]) == ["r0", "r1", "r2", "r3"]
    assert all(r["blurb"]["status"] == "ok" and r["blurb"]["completion_tokens"] > 0 for r in ds)
