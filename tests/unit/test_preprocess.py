"""The CPU stage called directly (no Ray): one prepared row per input row, errors as rows."""

import numpy as np
import pyarrow as pa
import pytest

from actors.preprocess import PreprocessRows
from actors.tokens import num_audio_tokens, num_image_tokens
from jobs.make_sample_data import SCHEMA, sample_rows
from schemas.rows import MEDIA_STRUCT, PREPARED_SCHEMA
from tests.helpers import MEDIA, make_config


@pytest.fixture
def prepare(tiny_model, tmp_path):
    return PreprocessRows(make_config(tiny_model, tmp_path))


def _by_id(table: pa.Table) -> dict:
    return {r["id"]: r for r in table.to_pylist()}


def test_sample_rows_one_to_one_with_expected_statuses(prepare):
    table = pa.Table.from_pylist(sample_rows(), schema=SCHEMA)
    out = prepare(table)
    assert out.schema == PREPARED_SCHEMA
    assert out.column("id").to_pylist() == table.column("id").to_pylist()
    rows = _by_id(out)
    assert rows["broken-truncated-jpeg"]["error_code"] == "IMAGE_DECODE_ERROR"
    assert rows["broken-empty-row"]["error_code"] == "MISSING_INPUT"
    ok = {k for k, r in rows.items() if r["status"] == "ok"}
    assert ok == {k for k in rows if not k.startswith("broken")}
    assert rows["image-cat"]["adapter"] == "vision"
    assert rows["image-audio-cat-question"]["adapter"] == "vision"
    assert rows["audio-fox-wav"]["adapter"] == "speech"
    assert rows["text-haiku"]["adapter"] is None
    assert rows["image-rocket-by-path"]["num_images"] == 1  # resolved against media_root


def test_prompt_tokens_add_up(prepare, tiny_tokenizer):
    out = _by_id(prepare(pa.Table.from_pylist(sample_rows(), schema=SCHEMA)))
    cat = out["image-cat"]
    im = cat["images"][0]
    text_tokens = len(tiny_tokenizer.encode(cat["prompt"])) - 1  # minus the <|image_1|> tag itself
    assert cat["prompt_tokens"] == text_tokens + num_image_tokens(im["width"], im["height"], 1)
    fox = out["audio-fox-wav"]
    samples = np.frombuffer(fox["audios"][0], "<f4")
    assert len(samples) == 55015
    assert fox["prompt_tokens"] == len(tiny_tokenizer.encode(fox["prompt"])) - 1 + num_audio_tokens(55015)


def test_budget_and_sampling_checks(tiny_model, tmp_path):
    cfg = make_config(tiny_model, tmp_path, engine={"max_model_len": 300}, sampling={"max_tokens": 8})
    rows = [
        {"id": "img", "image": {"bytes": (MEDIA / "cat.jpg").read_bytes(), "path": None}, "prompt": None},
        {"id": "txt", "prompt": "hello", "max_tokens": 1000},
        {"id": "bad-temp", "prompt": "hello", "temperature": -1.0},
        {"id": "ok", "prompt": "hello", "max_tokens": 4, "seed": 7},
        {"id": None, "prompt": "no id"},
    ]
    schema = pa.schema([("id", pa.string()), ("image", MEDIA_STRUCT), ("prompt", pa.string()),
                        ("max_tokens", pa.int64()), ("temperature", pa.float64()), ("seed", pa.int64())])  # fmt: skip
    out = PreprocessRows(cfg)(pa.Table.from_pylist(rows, schema=schema))
    got = [(r["id"], r["status"], r["error_code"]) for r in out.to_pylist()]
    assert got == [
        ("img", "error", "PROMPT_TOO_LONG"),  # ~410 image tokens > 300
        ("txt", "error", "PROMPT_TOO_LONG"),  # 1000 max_tokens > 300
        ("bad-temp", "error", "INVALID_SAMPLING"),
        ("ok", "ok", None),
        (None, "error", "MISSING_ID"),
    ]
    assert out.to_pylist()[3]["max_tokens"] == 4 and out.to_pylist()[3]["seed"] == 7
    assert "Try" in out.to_pylist()[0]["error_message"]


def test_too_many_media_and_wrong_types(prepare):
    rows = [
        {"id": "two", "image": [(MEDIA / "cat.jpg").read_bytes()] * 2, "prompt": None},
        {"id": "int-prompt", "prompt": 5},
    ]
    schema = pa.schema([("id", pa.string()), ("image", pa.list_(pa.binary())), ("prompt", pa.int64())])
    out = prepare(pa.Table.from_pylist(rows, schema=schema)).to_pylist()
    assert [r["error_code"] for r in out] == ["TOO_MANY_MEDIA", "INVALID_INPUT"]


def test_unexpected_exception_becomes_preprocess_error(prepare, monkeypatch):
    import actors.preprocess as mod

    def boom(*a, **k):
        raise ZeroDivisionError("boom")

    monkeypatch.setattr(mod, "build_prompt", boom)
    out = prepare(pa.Table.from_pylist([{"id": "a", "prompt": "hi"}])).to_pylist()
    assert out[0]["error_code"] == "PREPROCESS_ERROR" and "ZeroDivisionError" in out[0]["error_message"]
