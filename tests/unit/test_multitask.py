"""Several tasks per row: config checks, the CPU stage's per-task prompts and errors, the GPU stage's
request expansion and merge (a stand-in engine), the output's struct columns. Real engines: tests/integration."""

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pydantic import ValidationError

from actors.engines.contract import EngineResult
from actors.generate import GenerateRows
from actors.multitask import completion_budget, task_struct
from actors.preprocess import PreprocessRows
from schemas.multitask import TASK_PREFIX, TaskSpec
from schemas.output import OutputShape
from schemas.rows import MEDIA_STRUCT, OUTPUT_SCHEMA, TASK_RESULT
from tests.helpers import MEDIA, make_config

TASKS = {
    "summary": {"preset": "custom", "template": "Summarize {title}."},
    "tags": {"preset": "custom", "template": "Tags for {category}.", "n": 2, "max_tokens": 4},
    "label": {"preset": "custom", "template": "Is {title} fiction?", "structured": {"choice": ["yes", "no"]}},
}


class AnswerEngine:
    """Answers 'yes' with 5 prompt tokens, or fails a prompt that holds 'FAIL'."""

    def __init__(self, config):
        self.calls = []

    def stats(self):
        return {}

    def generate(self, requests):
        self.calls.append(requests)
        return [
            EngineResult(error="rejected") if "FAIL" in r.prompt
            else EngineResult(text="yes", prompt_tokens=r.prompt_tokens, completion_tokens=2, finish_reason="stop")
            for r in requests
        ]  # fmt: skip


@pytest.mark.parametrize(
    "extra, needle",
    [
        (
            {"task": {"preset": "transcribe"}, "tasks": {"t": {"preset": "ocr"}}},
            "task and tasks are both set",
        ),
        ({"tasks": {}}, "tasks holds 0 tasks"),
        ({"tasks": {"bad name": {"preset": "transcribe"}}}, "tasks.bad name"),
        ({"tasks": {"text": {"preset": "transcribe"}}}, "already an output column"),
        ({"tasks": {"t": {"preset": "transcribe", "max_tokens": 4096}}}, "tasks.t.max_tokens"),
        ({"tasks": {"t": {"preset": "transcribe", "n": 0}}}, "n"),
        ({"tasks": {"t": {"preset": "transcribe"}}, "media": {"long_audio": "chunk"}}, "long_audio"),
        (
            {"tasks": {"t": {"preset": "transcribe"}}, "structured": {"choice": ["a"]}},
            "tasks.NAME.structured",
        ),
    ],
)
def test_config_mistakes_name_the_key_and_say_try(tiny_model, tmp_path, extra, needle):
    with pytest.raises(ValidationError) as e:
        make_config(tiny_model, tmp_path, **extra)
    assert needle in str(e.value)


def _text_rows() -> pa.Table:
    return pa.Table.from_pylist(
        [
            {"id": "a", "title": "Dune", "category": "book"},
            {"id": "b", "title": "Emma", "category": None},  # the tags task cannot run; the others can
            {"id": "c", "title": None, "category": None},  # no task can run
            {"id": "d", "title": "FAIL", "category": "x"},  # the engine fails the tasks made from the title
        ]
    )


@pytest.fixture
def stages(tiny_model, tmp_path):
    cfg = make_config(tiny_model, tmp_path, tasks=TASKS, sampling={"max_tokens": 8, "seed": 7})
    return cfg, PreprocessRows(cfg), GenerateRows(cfg, run_id="r", engine_factory=AnswerEngine)


def test_one_output_row_per_input_row_with_a_struct_per_task(stages, tiny_tokenizer):
    cfg, pre, gen = stages
    prepared = pre(_text_rows())
    entries = {r["id"]: {t["name"]: t for t in r["tasks"]} for r in prepared.to_pylist()}
    summary = entries["a"]["summary"]
    assert summary["prompt"].startswith("<|user|>Summarize Dune.")
    assert summary["prompt_tokens"] == len(tiny_tokenizer.encode(summary["prompt"]))
    assert entries["b"]["tags"]["error_code"] == "MISSING_INPUT" and entries["b"]["summary"]["prompt"]
    out = gen(prepared)
    assert out.num_rows == 4 and out.schema.names[: len(OUTPUT_SCHEMA)] == OUTPUT_SCHEMA.names
    rows = {r["id"]: r for r in out.to_pylist()}
    a = rows["a"]
    assert a["status"] == "ok" and a["text"] is None
    assert (
        a[TASK_PREFIX + "tags"]["samples"] == ["yes", "yes"] and a[TASK_PREFIX + "summary"]["samples"] is None
    )
    assert a[TASK_PREFIX + "label"]["status"] == "ok"
    assert a["prompt_tokens"] == sum(e["prompt_tokens"] for e in entries["a"].values())
    assert a["completion_tokens"] == 2 + 4 + 2  # the tags task's two samples count
    b = rows["b"]
    assert (
        b["status"] == "error"
        and b["error_code"] == "TASKS_FAILED"
        and "tags (MISSING_INPUT)" in b["error_message"]
    )
    assert b[TASK_PREFIX + "summary"]["status"] == "ok"
    c = rows["c"]
    assert c["error_code"] == "TASKS_FAILED" and c[TASK_PREFIX + "summary"]["error_code"] == "MISSING_INPUT"
    d = rows["d"]
    assert (
        d[TASK_PREFIX + "summary"]["error_code"] == "ENGINE_ERROR"
        and d[TASK_PREFIX + "tags"]["status"] == "ok"
    )
    (batch,) = gen.engine.calls
    tags = [r for r in batch if "Tags for book" in r.prompt]
    assert [r.sampling.seed for r in tags] == [7, 8] and {r.sampling.max_tokens for r in tags} == {4}
    assert all(r.structured is not None for r in batch if "fiction" in r.prompt)
    # 3 tasks (tags twice) for a, summary and label for b, none for c, all for d
    assert len(batch) == 4 + 2 + 0 + 4


def test_a_row_error_is_every_tasks_error(tiny_model, tmp_path):
    cfg = make_config(
        tiny_model, tmp_path, input={"columns": {"audio": "audio"}},
        tasks={"t": {"preset": "transcribe"}, "fr": {"preset": "translate", "target_language": "French"}},
    )  # fmt: skip
    rows = pa.Table.from_pylist(
        [{"id": "x", "audio": {"bytes": b"not audio", "path": "x.wav"}},
         {"id": "y", "audio": {"bytes": (MEDIA / "fox.wav").read_bytes(), "path": "fox.wav"}}],
        schema=pa.schema([("id", pa.string()), ("audio", MEDIA_STRUCT)]),
    )  # fmt: skip
    prepared = PreprocessRows(cfg)(rows)
    y = prepared.to_pylist()[1]
    t, fr = y["tasks"]
    assert t["prompt"].startswith("<|user|><|audio_1|>") and fr["prompt"].startswith("<|user|><|audio_1|>")
    out = GenerateRows(cfg, run_id="r", engine_factory=AnswerEngine)(prepared).to_pylist()
    assert out[0]["error_code"] == "AUDIO_DECODE_ERROR"
    assert (
        out[0][TASK_PREFIX + "t"]["error_code"]
        == out[0][TASK_PREFIX + "fr"]["error_code"]
        == "AUDIO_DECODE_ERROR"
    )
    assert out[1]["status"] == "ok" and out[1][TASK_PREFIX + "fr"]["prompt_tokens"] == fr["prompt_tokens"]


def test_output_shape_writes_a_struct_column_per_task_with_datasets_features():
    rows = pa.Table.from_pylist([{"status": "ok"}], schema=OUTPUT_SCHEMA)
    rows = rows.append_column(
        TASK_PREFIX + "t", pa.array([{"status": "ok", "samples": ["a"]}], type=TASK_RESULT)
    )
    shape = OutputShape(tasks=("t",))
    out = shape.apply(rows)
    assert out.schema.field("t").type == TASK_RESULT
    features = shape.schema.metadata[b"huggingface"].decode()
    assert '"t": {"status": {"dtype": "string"' in features


def test_the_dry_runs_completion_budget_counts_each_runnable_task_and_sample(stages):
    cfg, pre, _ = stages
    prepared = {r["id"]: r for r in pre(_text_rows()).to_pylist()}
    # summary 8 (the job's), tags 4 twice, label 8; row b cannot run tags, row c nothing
    assert [completion_budget(prepared[k], cfg) for k in "abc"] == [8 + 4 * 2 + 8, 8 + 8, 0]


def test_the_dry_run_counts_a_row_no_task_can_run_as_tasks_failed(stages):
    # such a row leaves the CPU stage ok with no prompt tokens; the run writes it as TASKS_FAILED
    from pipelines.dry_run import dry_run
    from pipelines.validate import validate_job

    cfg, _, _ = stages
    pq.write_table(_text_rows(), cfg.input.path)
    report = dry_run(cfg, validate_job(cfg), tokens_per_s=1000.0)
    assert report["status"] == {"ok": 3, "error": 1} and report["error_codes"] == {"TASKS_FAILED": 1}


def test_a_choice_tasks_struct_carries_each_choices_probability():
    spec = TaskSpec(preset="custom", template="which?", structured={"choice": ["yes", "no"]})
    answer = EngineResult(text="yes", prompt_tokens=5, completion_tokens=2, finish_reason="stop")
    scored = answer.model_copy(update={"choice_probs": [0.75, 0.25]})
    assert task_struct(spec, [scored])["choice_probs"] == [
        {"choice": "yes", "prob": 0.75},
        {"choice": "no", "prob": 0.25},
    ]
    assert task_struct(spec, [answer])["choice_probs"] is None  # confidence off: no figures
    struct = pa.array([task_struct(spec, [scored])], type=TASK_RESULT)[0].as_py()
    assert struct["choice_probs"][0] == {"choice": "yes", "prob": 0.75} and struct["status"] == "ok"


def test_the_summary_counts_each_tasks_finish_reason_looped_answers_included():
    from pipelines.output.parts import WriteStats

    def answer(reason):
        return {"status": "ok", "text": "x", "finish_reason": reason}

    rows = [
        {f.name: None for f in OUTPUT_SCHEMA}
        | {"id": str(i), "status": "ok", TASK_PREFIX + "a": answer(a), TASK_PREFIX + "b": answer(b)}
        for i, (a, b) in enumerate([("stop", "repetition"), ("repetition", "length")])
    ]
    schema = OUTPUT_SCHEMA.append(pa.field(TASK_PREFIX + "a", TASK_RESULT)).append(
        pa.field(TASK_PREFIX + "b", TASK_RESULT)
    )
    stats = WriteStats.of_table(pa.Table.from_pylist(rows, schema))
    assert stats.finish_reasons == {"stop": 1, "repetition": 2, "length": 1}  # rows' own are null with tasks
    assert stats.tasks == {"a": {"ok": 2}, "b": {"ok": 2}}


def test_each_tasks_prompt_is_counted_once_per_row_the_longest_included(stages, tiny_tokenizer):
    """The longest task prompt decides whether the row fits; its count serves its task too (it was
    tokenized twice), and every task's count stays the tokenizer's exact count."""
    _, pre, _ = stages
    counted = []
    count = pre.counter.count
    pre.counter.count = lambda prompt, *a: counted.append(prompt) or count(prompt, *a)
    prepared = pre(_text_rows().slice(0, 1)).to_pylist()[0]
    prompts = [t["prompt"] for t in prepared["tasks"]]
    assert len(prompts) == 3 and sorted(counted) == sorted(prompts)
    assert all(t["prompt_tokens"] == len(tiny_tokenizer.encode(t["prompt"])) for t in prepared["tasks"])
