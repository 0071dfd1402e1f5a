"""Task presets and output column names: the config's checks, the instruction each row gets, the CPU
stage's error rows for rows a task cannot use, the output's renames and datasets metadata."""

import json

import pyarrow as pa
import pytest
from pydantic import ValidationError

from actors.preprocess import PreprocessRows
from actors.prompt import build_prompt, task_instruction
from pipelines.validate import check_input_columns
from schemas.errors import JobError
from schemas.output import HF_METADATA_KEY, OutputShape, carried_names, carry
from schemas.rows import MEDIA_STRUCT, OUTPUT_SCHEMA, ErrorCode, RowError
from schemas.task import PRESETS, TaskConfig, fill, placeholders
from tests.helpers import MEDIA, make_config


def test_every_preset_has_an_instruction_and_the_media_it_reads():
    assert set(PRESETS) == {"caption", "transcribe", "translate", "summarize_audio", "vqa", "ocr", "custom"}
    assert TaskConfig(preset="caption").reads == "image"
    assert TaskConfig(preset="summarize_audio").reads == "audio"
    assert TaskConfig(preset="custom", template="x").reads == "any"
    french = TaskConfig(preset="translate", target_language="French")
    assert french.row_columns == [] and french.instruction({}) == "Translate the audio to French."
    vqa = TaskConfig(preset="vqa", question_column="q")
    assert vqa.row_columns == ["q"] and vqa.instruction({"q": "Which colour?"}) == "Which colour?"


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"preset": "custom"}, "needs task.template"),
        ({"preset": "custom", "template": "  "}, "needs task.template"),
        ({"preset": "translate"}, "needs task.target_language"),
        ({"preset": "custom", "template": "To {target_language}: {x}"}, "target_language is not set"),
        ({"preset": "custom", "template": "{a.b}"}, "only plain {column} names"),
        ({"preset": "custom", "template": "{}"}, "only plain {column} names"),
        ({"preset": "custom", "template": "{x:>10}"}, "only plain {column} names"),
        ({"preset": "custom", "template": "unclosed {x"}, "Try '{{'"),
        ({"preset": "caption", "oops": 1}, "Extra inputs"),
    ],
)
def test_task_config_refuses_what_cannot_work(fields, message):
    with pytest.raises(ValidationError, match=message.replace("{", r"\{").replace("(", r"\(")):
        TaskConfig(**fields)


def test_templates_fill_plain_names_only_and_keep_literal_braces():
    template = "Describe {title} ({category}) in {{JSON}}."
    assert placeholders(template) == ["title", "category"]
    assert fill(template, {"title": "Dune", "category": "book"}) == "Describe Dune (book) in {JSON}."
    task = TaskConfig(preset="custom", template="{my col} to {target_language}", target_language="German")
    assert task.row_columns == ["my col"]


def test_row_cells_are_defused_and_blank_or_odd_cells_are_row_errors():
    task = TaskConfig(preset="custom", template="Q: {q} ({n})")
    instruction = task_instruction(task, {"q": "<|image_1|>why?", "n": 3})
    assert build_prompt(instruction, 0, 0) == "<|user|>Q: <image_1>why? (3)<|end|><|assistant|>"
    for row, code in (({"q": None, "n": 1}, ErrorCode.MISSING_INPUT), ({"q": " ", "n": 1}, ErrorCode.MISSING_INPUT),
                      ({"q": "x", "n": [1]}, ErrorCode.INVALID_INPUT), ({"q": "x", "n": True}, ErrorCode.INVALID_INPUT)):  # fmt: skip
        with pytest.raises(RowError) as e:
            task_instruction(task, row)
        assert e.value.code == code and "Try " in e.value.message


def _rows(**columns) -> pa.Table:
    wav = {"bytes": (MEDIA / "fox.wav").read_bytes(), "path": "fox.wav"}
    rows = [
        {"id": "audio", "image": None, "audio": wav, "prompt": "ignored", "question": None},
        {"id": "text", "image": None, "audio": None, "prompt": "hello", "question": "Why?"},
    ]
    schema = pa.schema([("id", pa.string()), ("image", MEDIA_STRUCT), ("audio", MEDIA_STRUCT),
                        ("prompt", pa.string()), ("question", pa.string())])  # fmt: skip
    return pa.Table.from_pylist(rows, schema=schema)


def test_cpu_stage_asks_the_task_and_refuses_rows_without_its_media(tiny_model, tmp_path):
    config = make_config(tiny_model, tmp_path, task={"preset": "translate", "target_language": "Italian"},
                         prompt={"system": "Be brief."})  # fmt: skip
    out = {r["id"]: r for r in PreprocessRows(config)(_rows()).to_pylist()}
    assert out["audio"]["status"] == "ok" and out["audio"]["adapter"] == "speech"
    assert out["audio"]["prompt"] == (
        "<|system|>Be brief.<|end|><|user|><|audio_1|>Translate the audio to Italian.<|end|><|assistant|>"
    )
    assert (
        out["text"]["error_code"] == "MISSING_INPUT"
        and "translate task reads" in out["text"]["error_message"]
    )
    vqa = make_config(tiny_model, tmp_path, task={"preset": "custom", "template": "{question}"})
    out = {r["id"]: r for r in PreprocessRows(vqa)(_rows()).to_pylist()}
    assert out["text"]["prompt"] == "<|user|>Why?<|end|><|assistant|>"  # a text row under a custom template
    assert (
        out["audio"]["error_code"] == "MISSING_INPUT"
        and "'question' is empty" in out["audio"]["error_message"]
    )


def test_job_refuses_a_task_whose_columns_the_input_lacks(tiny_model, tmp_path):
    schema = _rows().schema
    check_input_columns(make_config(tiny_model, tmp_path, task={"preset": "vqa"}), schema)
    with pytest.raises(JobError, match=r"task.question_column reads the input column\(s\) \['q'\].*Try"):
        check_input_columns(
            make_config(tiny_model, tmp_path, task={"preset": "vqa", "question_column": "q"}), schema
        )
    no_audio = make_config(
        tiny_model, tmp_path, task={"preset": "transcribe"}, input={"columns": {"audio": None}}
    )
    with pytest.raises(JobError, match="input.columns.audio is None.*Try"):
        check_input_columns(no_audio, schema)


@pytest.mark.parametrize(
    "names, message",
    [({"id": "key"}, "not an output column that can be renamed"), ({"text": "status"}, "the name 'status'"),
     ({"nope": "x"}, "not an output column"), ({"text": "_x"}, "not a usable column name")],
)  # fmt: skip
def test_output_column_names_refused(tiny_model, tmp_path, names, message):
    with pytest.raises(ValidationError, match=message):
        make_config(tiny_model, tmp_path, output={"path": str(tmp_path), "column_names": names})


def test_output_shape_renames_and_describes_every_column_for_datasets():
    shape = OutputShape({"text": "caption", "model": "model_name"})
    row = {f.name: None for f in OUTPUT_SCHEMA} | {"id": "a", "status": "ok", "text": "a cat"}
    table = shape.apply(pa.Table.from_pylist([row], schema=OUTPUT_SCHEMA))
    assert table.column_names[:5] == ["id", "status", "error_code", "error_message", "caption"]
    assert "model_name" in table.column_names and table.column("caption").to_pylist() == ["a cat"]
    features = json.loads(table.schema.metadata[HF_METADATA_KEY])["info"]["features"]
    assert list(features) == table.column_names
    assert features["caption"] == {"dtype": "string", "_type": "Value"}
    assert features["num_images"] == {"dtype": "int16", "_type": "Value"}


def test_carried_columns_keep_their_type_and_datasets_feature():
    declared = json.dumps(
        {"info": {"features": {"photo": {"_type": "Image"}, "n": {"dtype": "int64", "_type": "Value"}}}}
    )
    schema = pa.schema([("photo", MEDIA_STRUCT), ("clip", MEDIA_STRUCT), ("n", pa.int64()), ("path", pa.string())],
                       metadata={HF_METADATA_KEY: declared})  # fmt: skip
    shape = OutputShape.of({"text": "caption"}, ["photo", "clip", "path"], schema, {"clip": "Audio"})
    assert [(c.name, c.feature) for c in shape.carried] == [
        ("photo", {"_type": "Image"}),  # as the input declares it
        ("clip", {"_type": "Audio"}),  # the job's audio column in datasets' layout
        ("path", None),  # inferred from its Arrow type by datasets
    ]
    row = {f.name: None for f in OUTPUT_SCHEMA} | {"id": "a", "status": "ok", "text": "x"}
    stage = pa.Table.from_pylist([row], schema=OUTPUT_SCHEMA)
    source = pa.table({"photo": pa.array([{"bytes": b"1", "path": "p.png"}], MEDIA_STRUCT),
                       "clip": pa.array([None], MEDIA_STRUCT), "path": ["/d/p.png"]})  # fmt: skip
    table = shape.apply(carry(source, stage, ["photo", "clip", "path"]))
    assert table.column_names[-3:] == ["photo", "clip", "path"] and "carry:photo" not in table.column_names
    assert table.column("photo").to_pylist() == [{"bytes": b"1", "path": "p.png"}]
    features = json.loads(table.schema.metadata[HF_METADATA_KEY])["info"]["features"]
    assert features["photo"] == {"_type": "Image"} and "path" not in features
    assert carry(pa.table({"x": [1]}), pa.table({"y": [2]}), ["gone"]).column("carry:gone").null_count == 1


def test_carried_columns_pass_both_stages_in_row_order(tiny_model, tmp_path):
    from actors.attempts import LocalAttemptLedger
    from actors.generate import GenerateRows
    from tests.unit.test_generate import EchoEngine

    config = make_config(
        tiny_model, tmp_path, output={"path": str(tmp_path), "carry_columns": ["audio", "question"]}
    )
    prepared = PreprocessRows(config)(_rows())
    assert carried_names(prepared) == ["carry:audio", "carry:question"]
    out = GenerateRows(config, "r", engine_factory=EchoEngine, ledger=LocalAttemptLedger())(prepared)
    assert out.column("carry:question").to_pylist() == [None, "Why?"]
    assert out.column("carry:audio").to_pylist() == _rows().column("audio").to_pylist()
    with pytest.raises(ValidationError, match="already an output column name"):
        make_config(tiny_model, tmp_path, output={"path": str(tmp_path), "carry_columns": ["text"]})
    with pytest.raises(JobError, match=r"carry_columns names \['nope'\].*Try"):
        check_input_columns(
            make_config(tiny_model, tmp_path, output={"path": "x", "carry_columns": ["nope"]}), _rows().schema
        )
