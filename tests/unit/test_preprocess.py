"""The CPU stage called directly (no Ray): one prepared row per input row, errors as rows."""

import io

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from actors.preprocess import PreprocessRows
from actors.tokens import num_audio_frames, num_audio_tokens, num_image_tokens
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
    assert im["tokens"] == num_image_tokens(320, 213, 1)  # cat.jpg, one 448 px crop at dynamic_hd 1
    assert cat["prompt_tokens"] == text_tokens + im["tokens"]
    assert (im["width"], im["height"], len(im["canvas"]), len(im["mask"])) == (
        448,
        448,
        448 * 448 * 3,
        2 * 32 * 32,
    )
    fox = out["audio-fox-wav"]
    (audio,) = fox["audios"]
    assert audio["frames"] == num_audio_frames(55015) and len(audio["features"]) == audio["frames"] * 80 * 4
    assert fox["prompt_tokens"] == len(tiny_tokenizer.encode(fox["prompt"])) - 1 + num_audio_tokens(55015)


def test_budget_and_sampling_checks(tiny_model, tmp_path):
    cfg = make_config(tiny_model, tmp_path, engine={"max_model_len": 300}, sampling={"max_tokens": 8})
    rows = [
        {"id": "img", "image": {"bytes": (MEDIA / "cat.jpg").read_bytes(), "path": None}, "prompt": None},
        {"id": "txt", "prompt": "hello", "max_tokens": 1000},
        {"id": "bad-temp", "prompt": "hello", "temperature": -1.0},
        {"id": "ok", "prompt": "hello", "max_tokens": 4, "seed": 7, "stop": ["END", "###"]},
        {"id": None, "prompt": "no id"},
        {"id": "bad-stop", "prompt": "hello", "stop": [""]},
    ]
    schema = pa.schema([("id", pa.string()), ("image", MEDIA_STRUCT), ("prompt", pa.string()),
                        ("max_tokens", pa.int64()), ("temperature", pa.float64()), ("seed", pa.int64()),
                        ("stop", pa.list_(pa.string()))])  # fmt: skip
    out = PreprocessRows(cfg)(pa.Table.from_pylist(rows, schema=schema))
    got = [(r["id"], r["status"], r["error_code"]) for r in out.to_pylist()]
    assert got == [
        ("img", "error", "PROMPT_TOO_LONG"),  # ~410 image tokens > 300
        ("txt", "error", "PROMPT_TOO_LONG"),  # 1000 max_tokens > 300
        ("bad-temp", "error", "INVALID_SAMPLING"),
        ("ok", "ok", None),
        (None, "error", "MISSING_ID"),
        ("bad-stop", "error", "INVALID_SAMPLING"),
    ]
    ok = out.to_pylist()[3]
    assert (ok["max_tokens"], ok["seed"], ok["stop"]) == (4, 7, ["END", "###"])
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


def test_audio_as_float_array_with_a_rate_column(prepare):
    rate = 8000
    wave = (0.1 * np.sin(np.arange(rate) / 5)).tolist()  # 1 s at 8 kHz
    rows = [
        {"id": "arr", "audio": wave, "sampling_rate": rate},
        {"id": "hf-decoded", "audio": None, "sampling_rate": None},
        {"id": "no-rate", "audio": wave, "sampling_rate": None},
    ]
    schema = pa.schema(
        [("id", pa.string()), ("audio", pa.list_(pa.float32())), ("sampling_rate", pa.int32())]
    )
    table = pa.Table.from_pylist(rows, schema=schema)
    out = prepare(table).to_pylist()
    assert [r["error_code"] for r in out] == [None, "MISSING_INPUT", "INVALID_INPUT"]
    assert out[0]["adapter"] == "speech" and out[0]["audios"][0]["frames"] == num_audio_frames(16000)
    # the decoded form Hugging Face datasets writes: struct<array, sampling_rate>
    decoded = pa.Table.from_pylist(
        [{"id": "d", "audio": {"array": wave, "sampling_rate": rate}}],
        schema=pa.schema([("id", pa.string()), ("audio", pa.struct([("array", pa.list_(pa.float32())),
                                                                    ("sampling_rate", pa.int32())]))]),
    )  # fmt: skip
    (row,) = prepare(decoded).to_pylist()
    assert row["status"] == "ok" and row["audio_seconds"] == pytest.approx(1.0)


def test_long_audio_is_chunked_into_windows(tiny_model, tmp_path, tiny_tokenizer):
    cfg = make_config(
        tiny_model, tmp_path, media={"long_audio": "chunk", "chunk_seconds": 4, "chunk_overlap_seconds": 1}
    )
    wave = np.zeros(10 * 16000, np.float32).tolist()
    schema = pa.schema(
        [("id", pa.string()), ("audio", pa.list_(pa.float32())), ("sampling_rate", pa.int32())]
    )
    out = PreprocessRows(cfg)(
        pa.Table.from_pylist([{"id": "long", "audio": wave, "sampling_rate": 16000}], schema=schema)
    )
    (row,) = out.to_pylist()
    windows = [a["frames"] for a in row["audios"]]
    assert row["audio_chunks"] == len(windows) == 3  # 0-4 s, 3-7 s, 6-10 s
    assert windows == [num_audio_frames(64000)] * 3
    text = len(tiny_tokenizer.encode(row["prompt"])) - 1
    assert row["prompt_tokens"] == 3 * (text + num_audio_tokens(64000))


def test_image_over_budget_policy(tiny_model, tmp_path):
    buf = io.BytesIO()
    Image.new("RGB", (1792, 896), (10, 200, 30)).save(buf, format="PNG")  # 4x2 crops of 448 px
    big = {"id": "big", "image": {"bytes": buf.getvalue(), "path": None}, "prompt": None}
    schema = pa.schema([("id", pa.string()), ("image", MEDIA_STRUCT), ("prompt", pa.string())])
    table = pa.Table.from_pylist([big], schema=schema)
    # 2353 image tokens at dynamic_hd 16; images within one crop cost the same at any size, so
    # only multi-crop images can shrink
    limits = {"max_model_len": 1200, "dynamic_hd": 16}
    rejected = PreprocessRows(make_config(tiny_model, tmp_path, engine=limits))(table).to_pylist()[0]
    assert rejected["error_code"] == "PROMPT_TOO_LONG" and "downscale" in rejected["error_message"]
    cfg = make_config(tiny_model, tmp_path, engine=limits, media={"image_over_budget": "downscale"})
    fitted = PreprocessRows(cfg)(table).to_pylist()[0]
    assert fitted["status"] == "ok" and fitted["prompt_tokens"] + 8 <= 1200
    assert fitted["media_adjustments"].startswith("image downscaled 1792x896 -> ")
    im = fitted["images"][0]
    w, h = (int(v) for v in fitted["media_adjustments"].split(" -> ")[1].split(" ")[0].split("x"))
    assert w < 1792 and im["tokens"] == num_image_tokens(w, h, 16) < 2353
    assert len(im["canvas"]) == im["width"] * im["height"] * 3 and im["width"] * im["height"] < 1792 * 896
    text = len(PreprocessRows(cfg).counter._tokenizer.encode(fitted["prompt"])) - 1
    assert fitted["prompt_tokens"] == text + im["tokens"]


def test_fast_jpeg_decode_option_changes_pixels_not_tokens(tiny_model, tmp_path):
    photo = Image.open(MEDIA / "coffee.jpg").convert("RGB").resize((4032, 3024))
    buf = io.BytesIO()
    photo.save(buf, format="JPEG", quality=90)
    schema = pa.schema([("id", pa.string()), ("image", MEDIA_STRUCT), ("prompt", pa.string())])
    table = pa.Table.from_pylist([{"id": "cam", "image": {"bytes": buf.getvalue(), "path": None}, "prompt": None}],
                                 schema=schema)  # fmt: skip
    limits = {"dynamic_hd": 4}
    exact = PreprocessRows(make_config(tiny_model, tmp_path, engine=limits))(table).to_pylist()[0]
    fast_cfg = make_config(tiny_model, tmp_path, engine=limits, media={"fast_jpeg_decode": True})
    fast = PreprocessRows(fast_cfg)(table).to_pylist()[0]
    assert exact["status"] == fast["status"] == "ok"
    assert fast["prompt_tokens"] == exact["prompt_tokens"]
    assert fast["images"][0]["uuid"] != exact["images"][0]["uuid"]
    assert fast["images"][0]["canvas"] != exact["images"][0]["canvas"]  # decoded at 1/2 or 1/4, then resized


def test_trust_settings_reach_the_media_source(tiny_model, tmp_path):
    cfg = make_config(
        tiny_model,
        tmp_path,
        input={"allowed_media_roots": [str(tmp_path)], "allow_http": True, "remote_protocols": ["s3"]},
        media={"max_media_bytes": 1234},
    )
    source = PreprocessRows(cfg).source
    assert (source.media_root, source.allowed_roots, source.max_bytes) == (str(MEDIA), (str(tmp_path),), 1234)
    assert source.protocols == {"s3", "http", "https"}


def test_preprocess_s_is_the_rows_own_cpu_time(prepare):
    out = prepare(
        pa.Table.from_pylist([{"id": "a", "prompt": "hi"}, {"id": "b", "prompt": None}])
    ).to_pylist()
    assert [r["error_code"] for r in out] == [None, "MISSING_INPUT"]
    assert all(0 <= r["preprocess_s"] < 5 for r in out)


@pytest.mark.parametrize("fast_jpeg_decode", [False, True])
def test_image_aspect_pad_letterboxes_slivers_instead_of_rejecting(tiny_model, tmp_path, fast_jpeg_decode):
    from actors.tokens import fitted_size, letterbox_size

    buf = io.BytesIO()
    Image.open(MEDIA / "coffee.jpg").convert("RGB").resize((4000, 9)).save(buf, format="JPEG")
    rows = [{"id": "sliver", "image": {"bytes": buf.getvalue(), "path": None}, "audio": None, "prompt": None}]
    table = pa.Table.from_pylist(rows, schema=SCHEMA)
    engine = {"dynamic_hd": 4}
    rejected = PreprocessRows(make_config(tiny_model, tmp_path, engine=engine))(table).to_pylist()[0]
    assert rejected["error_code"] == "IMAGE_ASPECT_RATIO_UNSUPPORTED"
    media = {"image_aspect": "pad", "fast_jpeg_decode": fast_jpeg_decode}
    (row,) = PreprocessRows(make_config(tiny_model, tmp_path, engine=engine, media=media))(table).to_pylist()
    width, height = letterbox_size(4000, 9, 4)
    assert row["status"] == "ok" and height > 9 and width == 4000
    assert (
        row["media_adjustments"]
        == f"image #1 letterboxed 4000x9 -> {width}x{height} (too elongated for the crop grid)"
    )
    (image,) = row["images"]
    assert image["tokens"] == num_image_tokens(width, height, 4)
    canvas = np.frombuffer(image["canvas"], np.uint8).reshape(image["height"], image["width"], 3)
    fitted_height = fitted_size(width, height, 4)[1][1]
    assert (canvas[0] == 255).all() and not (canvas[fitted_height // 2] == 255).all()  # centred, padded white


def test_a_rows_structured_cell_may_ask_a_schema_or_choices_but_not_a_regex(tiny_model, tmp_path):
    import json

    config = make_config(
        tiny_model, tmp_path, input={"columns": {"image": None, "audio": None, "structured": "ask"}}
    )
    cells = {"choice": json.dumps({"choice": ["yes", "no"]}), "regex": json.dumps({"regex": "(a+)+b"}),
             "none": None}  # fmt: skip
    table = pa.table({"id": list(cells), "prompt": ["hi"] * 3, "ask": list(cells.values())})
    rows = {r["id"]: r for r in PreprocessRows(config)(table).to_pylist()}
    assert rows["choice"]["status"] == "ok" and json.loads(rows["choice"]["structured"])["choice"] == [
        "yes",
        "no",
    ]
    assert rows["none"]["status"] == "ok" and rows["none"]["structured"] is None
    refused = rows["regex"]
    assert (
        refused["error_code"] == "INVALID_STRUCTURED" and "Try structured.regex" in refused["error_message"]
    )


def test_a_rows_json_schema_may_not_use_patterns_remote_refs_deep_nesting_or_be_huge(tiny_model, tmp_path):
    """Rows are untrusted: a pattern would run in Python's backtracking re when the answer is checked, a
    remote $ref would be fetched (or fail the batch), deep nesting and huge cells cost memory and time."""
    import json

    from schemas.annotation import STRUCTURED_CELL_CHARS

    config = make_config(
        tiny_model, tmp_path, input={"columns": {"image": None, "audio": None, "structured": "ask"}}
    )
    deep = '{"items": ' * 1500 + "{}" + "}" * 1500  # within the size cap, past Python's recursion limit
    cells = {
        "named-pattern": {"type": "object", "properties": {"pattern": {"type": "string"}}},  # a name: fine
        "local-ref": {"$defs": {"s": {"type": "string"}}, "$ref": "#/$defs/s"},
        "pattern": {"type": "object", "properties": {"x": {"type": "string", "pattern": "^(a+)+b$"}}},
        "pattern-properties": {"type": "object", "patternProperties": {"^(a+)+$": {"type": "string"}}},
        "remote-ref": {"$ref": "http://127.0.0.1:9/schema.json"},
        "deep": deep,
        "huge": {"enum": ["x" * STRUCTURED_CELL_CHARS]},
    }
    texts = [json.dumps({"json_schema": c}) if k != "deep" else '{"json_schema": ' + c + "}"
             for k, c in cells.items()]  # fmt: skip
    table = pa.table({"id": list(cells), "prompt": ["hi"] * len(cells), "ask": texts})
    rows = {r["id"]: r for r in PreprocessRows(config)(table).to_pylist()}
    assert {k: r["status"] for k, r in rows.items() if r["status"] == "ok"} == dict.fromkeys(
        ["named-pattern", "local-ref"], "ok"
    )
    for key in ("pattern", "pattern-properties", "remote-ref", "deep", "huge"):
        assert rows[key]["error_code"] == "INVALID_STRUCTURED" and "Try " in rows[key]["error_message"], key
    assert "pattern" in rows["pattern-properties"]["error_message"]
    assert "$defs" in rows["remote-ref"]["error_message"]
