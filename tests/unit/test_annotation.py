"""Annotation without an engine: the config's structured / repetition / confidence sections, the JSON
schema -> Arrow / datasets features mapping, the answer checks and the confidence arithmetic."""

import json
import math
import subprocess
import sys

import pyarrow as pa
import pytest
from pydantic import ValidationError

from actors.output_check import choice_probabilities, logprob_summary, problem, verdict
from schemas.annotation import JsonArrow, RepetitionConfig, StructuredSpec, first_loop, loops, repetition_rule
from schemas.output import OutputShape, TypedColumn
from schemas.rows import OUTPUT_SCHEMA, ErrorCode
from tests.helpers import REPO, make_config

SCHEMA = {
    "type": "object",
    "properties": {
        "label": {"enum": ["cat", "dog"]},
        "score": {"type": "number"},
        "count": {"type": ["integer", "null"]},
        "ok": {"type": "boolean"},
        "tags": {"type": "array", "items": {"type": "string"}},
        "where": {"$ref": "#/$defs/place"},
        "any": {"anyOf": [{"type": "string"}, {"type": "integer"}]},
        "open": {"type": "object"},
    },
    "required": ["label"],
    "$defs": {"place": {"type": "object", "properties": {"city": {"type": "string"}}}},
}


def test_json_schema_maps_to_arrow_types_and_unsupported_parts_to_json_text():
    assert JsonArrow(SCHEMA).type == pa.struct(
        [
            ("label", pa.string()),
            ("score", pa.float64()),
            ("count", pa.int64()),
            ("ok", pa.bool_()),
            ("tags", pa.list_(pa.string())),
            ("where", pa.struct([("city", pa.string())])),
            ("any", pa.string()),
            ("open", pa.string()),
        ]
    )
    value = JsonArrow(SCHEMA).value(
        {"label": "cat", "score": 2, "ok": True, "tags": ["a"], "where": {"city": "Oslo", "x": 1},
         "any": 5, "open": {"k": [1]}, "extra": 3}
    )  # fmt: skip
    assert value == {"label": "cat", "score": 2.0, "count": None, "ok": True, "tags": ["a"],
                     "where": {"city": "Oslo"}, "any": "5", "open": '{"k": [1]}'}  # fmt: skip
    recursive = {"$ref": "#", "type": "object", "properties": {"child": {"$ref": "#"}}}
    assert JsonArrow({"type": "object", "properties": {"n": recursive}}).type.field("n").type == pa.string()


def test_typed_column_is_written_with_datasets_struct_features(tmp_path):
    import datasets
    import pyarrow.parquet as pq

    rows = [{"id": "a", "status": "ok", "text": json.dumps({"label": "dog", "ok": False, "tags": ["x"]})},
            {"id": "b", "status": "error", "text": '{"label": "cat"}'},
            {"id": "c", "status": "ok", "text": "not json"}]  # fmt: skip
    table = pa.Table.from_pylist(
        [{**{f.name: None for f in OUTPUT_SCHEMA}, **r} for r in rows], OUTPUT_SCHEMA
    )
    shape = OutputShape(typed=TypedColumn("attributes", json.dumps(SCHEMA)))
    pq.write_table(shape.apply(table), tmp_path / "part.parquet")
    ds = datasets.load_dataset("parquet", data_files=str(tmp_path / "part.parquet"), split="train")
    features = ds.features["attributes"]
    assert features["label"] == datasets.Value("string") and features["ok"] == datasets.Value("bool")
    assert features["tags"] == datasets.List(datasets.Value("string"))
    assert features["where"] == {"city": datasets.Value("string")}
    assert ds.features["choice_probs"] == datasets.List(
        {"choice": datasets.Value("string"), "prob": datasets.Value("float32")}
    )
    got = ds["attributes"]
    assert got[0]["label"] == "dog" and got[0]["ok"] is False and got[0]["tags"] == ["x"]
    assert got[1] is None and got[2] is None  # an error row; an answer that is not JSON


@pytest.mark.parametrize(
    "spec, text, finish, code",
    [
        ({"json_schema": SCHEMA}, '{"label": "cat"}', "stop", None),
        ({"json_schema": SCHEMA}, '{"label": "cat"', "length", ErrorCode.OUTPUT_TRUNCATED),
        ({"json_schema": SCHEMA}, '{"label": "cat"', "stop", ErrorCode.OUTPUT_INVALID),  # not JSON
        ({"json_schema": SCHEMA}, '{"label": "cow"}', "stop", ErrorCode.OUTPUT_INVALID),  # off the schema
        ({"json_schema": SCHEMA}, '{"score": 1}', "repetition", ErrorCode.OUTPUT_INVALID),
        ({"choice": ["yes", "no"]}, "yes", "stop", None),
        ({"choice": ["yes", "no"]}, "yes ", "stop", ErrorCode.OUTPUT_INVALID),
        ({"choice": ["yes", "no"]}, "ye", "length", ErrorCode.OUTPUT_TRUNCATED),
        ({"regex": r"\d{4}-\d{2}"}, "2024-05", "stop", None),
        ({"regex": r"\d{4}-\d{2}"}, "2024-05x", "stop", ErrorCode.OUTPUT_INVALID),  # a full match only
    ],
)
def test_answers_are_checked_against_what_was_asked(spec, text, finish, code):
    got = verdict(text, finish, StructuredSpec(**spec))
    assert (got and got[0]) == code
    if got:
        assert "raw text kept" in got[1] and "Try " in got[1]


def test_an_answer_nested_too_deeply_is_an_invalid_row_not_a_crash():
    deep = "[" * 5000 + "]" * 5000  # Python's parser recurses per level
    got = verdict(deep, "stop", StructuredSpec(json_schema={"type": "array"}))
    assert got[0] == ErrorCode.OUTPUT_INVALID and "nested too deeply" in got[1]
    column = TypedColumn("t", json.dumps({"type": "object", "properties": {"n": {"type": "integer"}}}))
    assert column.column([deep, '{"n": 1e400}', '{"n": 3}']).to_pylist() == [None, {"n": None}, {"n": 3}]


def test_problem_names_where_the_json_is_off():
    assert "label" in problem('{"label": 3}', StructuredSpec(json_schema=SCHEMA))


@pytest.mark.parametrize(
    "spec, words",
    [
        ({"json_schema": {"type": "objekt"}}, "not a valid JSON Schema"),
        ({"choice": ["a", "a"]}, "repeated"),
        ({"regex": "(unclosed"}, "does not compile"),
        ({"choice": ["a"], "regex": "a"}, "exactly one"),
        ({}, "exactly one"),
    ],
)
def test_a_bad_spec_is_refused_with_a_try(spec, words):
    with pytest.raises(ValidationError, match=words) as e:
        StructuredSpec(**spec)
    assert "Try " in str(e.value)


def test_invalid_json_schema_is_exit_2_with_one_line(tmp_path):
    config = tmp_path / "job.yaml"
    config.write_text(
        "input: {path: in.parquet}\noutput: {path: out}\nmodel: {path: m}\n"
        "structured: {json_schema: {type: objekt}}\n"
    )
    done = subprocess.run([sys.executable, "-m", "jobs.run", "--config", str(config)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    assert "structured" in lines[0] and "not a valid JSON Schema" in lines[0] and "Try " in lines[0]


@pytest.mark.parametrize(
    "sections, words",
    [
        ({"media": {"long_audio": "chunk"}, "structured": {"regex": "a+"}}, "long_audio: single"),
        ({"structured": {"json_schema": {"type": "object"}, "typed_column": "text"}}, "already an output"),
        ({"repetition": {"min_pattern_size": 9, "max_pattern_size": 4}}, "min_pattern_size"),
        ({"repetition": {"min_count": 1}}, "greater than or equal to 2"),
    ],
)
def test_annotation_config_mistakes(sections, words, tmp_path):
    with pytest.raises(ValidationError, match=words):
        make_config("/m", tmp_path, **sections)


def test_repetition_rule_matches_a_tail_repeated_min_count_times():
    rule = RepetitionConfig(min_pattern_size=1, max_pattern_size=3, min_count=3)
    assert loops([9, 1, 2, 1, 2, 1, 2], rule)
    assert not loops([1, 2, 1, 2, 1, 3], rule)
    assert not loops([1, 2, 3, 4, 1, 2, 3, 4, 1, 2, 3, 4], rule)  # a pattern longer than max_pattern_size
    assert first_loop([5, 7, 7, 7, 7, 7], rule) == 4  # where generation stops
    assert first_loop([1, 2, 3], rule) is None
    assert RepetitionConfig().enabled  # on by default


def test_the_loop_stop_is_off_when_disabled_or_with_ignore_eos(tmp_path):
    assert repetition_rule(make_config("/m", tmp_path)) == RepetitionConfig()
    assert repetition_rule(make_config("/m", tmp_path, repetition={"enabled": False})) is None
    assert repetition_rule(make_config("/m", tmp_path, sampling={"ignore_eos": True})) is None


def test_confidence_arithmetic():
    assert logprob_summary([-1.0, -3.0]) == (-2.0, -3.0) and logprob_summary([]) == (None, None)
    half = math.log(0.5)
    # "p" commits to positive; "n" is shared by negative and neutral: the walk goes on along the sample
    positions = [("n", [("n", half), ("p", math.log(0.3))]), ("e", [("e", half), ("eg", math.log(0.1))]),
                 ("u", [("u", math.log(0.6)), ("g", math.log(0.4))])]  # fmt: skip
    probs = choice_probabilities(positions, ["positive", "negative", "neutral"])
    assert probs == pytest.approx([0.3, 0.5 * 0.1 + 0.5 * 0.5 * 0.4, 0.5 * 0.5 * 0.6])
    assert sum(probs) <= 1 + 1e-9


def test_a_chunked_row_is_flagged_when_a_window_looped_and_its_confidence_is_merged():
    from actors.engines.contract import EngineResult
    from actors.generate import merge_results

    def window(finish, tokens, mean, low):
        return EngineResult(text="x", prompt_tokens=5, completion_tokens=tokens, finish_reason=finish,
                            logprob_mean=mean, logprob_min=low)  # fmt: skip

    merged = merge_results([window("repetition", 30, -1.0, -4.0), window("stop", 10, -3.0, -3.5)])
    assert merged.finish_reason == "repetition"
    assert merged.logprob_mean == pytest.approx((-30 - 30) / 40) and merged.logprob_min == -4.0
    assert (
        merge_results([window("repetition", 3, -1, -1), window("length", 3, -1, -1)]).finish_reason
        == "length"
    )


def test_the_summary_counts_looped_rows():
    from jobs.run import format_summary
    from pipelines.output.parts import WriteStats

    table = pa.Table.from_pylist(
        [{**{f.name: None for f in OUTPUT_SCHEMA}, "id": str(i), "status": "ok", "finish_reason": reason}
         for i, reason in enumerate(["stop", "repetition", "repetition", "length"])],
        OUTPUT_SCHEMA,
    )  # fmt: skip
    stats = WriteStats.of_table(table)
    stats.add(WriteStats.of_table(table.slice(1, 1)))
    assert stats.finish_reasons == {"stop": 1, "repetition": 3, "length": 1}
    summary = {
        "run_id": "r", "model": "m", "input": "in", "output": "out", "rows_written": 5,
        "rows_skipped_already_done": 0, "status": {"ok": 5}, "error_codes": {},
        "finish_reasons": dict(stats.finish_reasons), "prompt_tokens": 1, "completion_tokens": 1,
        "wall_s": 1.0, "rows_per_s": 5.0,
        "audit": {"ok": True, "input_rows": 5, "output_rows": 5, "missing_ids": 0, "duplicate_ids": 0},
    }  # fmt: skip
    assert "looped rows      3 stopped as loops" in format_summary(summary)
    summary["finish_reasons"] = {"stop": 5}
    assert "looped rows" not in format_summary(summary)


def test_a_json_schema_ref_must_stay_inside_the_schema():
    defs = {"label": {"enum": ["a", "b"], "$comment": "x"}, "required": {"type": "string"}}
    for ref in ("#/$defs/label", "#/$defs/required", "#"):  # a def may be named like a keyword
        local = {"$defs": defs, "type": "object", "properties": {"x": {"$ref": ref}}}
        assert StructuredSpec(json_schema=local).json_schema == local
    # outside (fetched), dangling, an anchor, or a pointer into data (an enum value holding a pattern)
    for ref in ("http://127.0.0.1:9/schema.json", "other.json#/x", "file:///etc/passwd", "#/$defs/missing",
                "#nope", "#/$defs/label/enum/0", "#/$defs/label/$comment", "#/$defs"):  # fmt: skip
        with pytest.raises(ValidationError, match="does not point at a schema under"):
            StructuredSpec(json_schema={"$defs": defs, "type": "object", "properties": {"x": {"$ref": ref}}})


def test_an_answer_check_the_validator_cannot_apply_fails_the_answer_not_the_batch():
    # a $ref into a nested $id's resource: it passes the spec's check, jsonschema cannot resolve it
    schema = {"type": "object", "properties": {"x": {"$id": "http://127.0.0.1:9/other", "$ref": "#/$defs/a"}},
              "$defs": {"a": {"type": "string"}}}  # fmt: skip
    spec = StructuredSpec(json_schema=schema)
    assert "could not be applied" in problem('{"x": "y"}', spec)
