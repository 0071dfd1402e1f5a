"""Each task preset's YAML under jobs/configs/ on the tiny model with the real vLLM CPU engine (in this
process, SigLIP shrunk; one engine for every preset): a handful of rows, one tiny image among them. The
job's GPU-sized sections (input and output places, model, engine, pools) are replaced by the tiny ones;
what the preset sets (task, prompt, output column names, media) is the file's."""

import io

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from actors.generate import GenerateRows
from actors.preprocess import PreprocessRows
from schemas.job import JobConfig
from schemas.output import OutputShape
from schemas.rows import MEDIA_STRUCT
from tests.helpers import MEDIA, REPO, make_config, tiny_overrides

PRESET_FILES = sorted((REPO / "jobs" / "configs").glob("task_*.yaml"))


def _png() -> bytes:
    buf = io.BytesIO()
    Image.fromarray((np.random.default_rng(0).random((24, 32, 3)) * 255).astype(np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _rows() -> pa.Table:
    png = {"bytes": _png(), "path": "tiny.png"}
    fox, morning = ({"bytes": (MEDIA / n).read_bytes(), "path": n} for n in ("fox.wav", "morning.mp3"))
    text = {"image": None, "audio": None}
    rows = [
        {"id": "img", "image": png, "audio": None, "question": "What is it?", "category": "mug", "title": "Blue"},
        {"id": "fox", "image": None, "audio": fox, "question": None, "category": None, "title": None},
        {"id": "morning", "image": None, "audio": morning, "question": None, "category": None, "title": None},
        {"id": "text", **text, "question": "Why?", "category": "book", "title": "Dune"},
    ]  # fmt: skip
    for row in rows:  # the custom preset's file names its columns as a shop's data would
        row.update(sku=row["id"], photo=row["image"])
    schema = pa.schema([("id", pa.string()), ("sku", pa.string()), ("image", MEDIA_STRUCT),
                        ("photo", MEDIA_STRUCT), ("audio", MEDIA_STRUCT), ("question", pa.string()),
                        ("category", pa.string()), ("title", pa.string())])  # fmt: skip
    return pa.Table.from_pylist(rows, schema=schema)


# preset -> ids answered (the rest are MISSING_INPUT: not the media the task reads, or an empty cell)
ANSWERED = {
    "caption": {"img"},
    "ocr": {"img"},
    "vqa": {"img"},  # the text row has a question but no image
    "transcribe": {"fox", "morning"},
    "translate": {"fox", "morning"},
    "summarize_audio": {"fox", "morning"},
    "custom": {"img", "text"},  # an image row and a text row; the audio rows have no category/title
}


@pytest.fixture(scope="module")
def tiny(tiny_model, tmp_path_factory):
    config = make_config(
        tiny_model,
        tmp_path_factory.mktemp("presets"),
        engine={"init_hook": "jobs.tiny_vision:shrink_siglip"},
    )
    return config, GenerateRows(config, run_id="presets").engine


def test_there_is_a_yaml_for_every_preset():
    assert {JobConfig.from_yaml(f).task.preset for f in PRESET_FILES} == set(ANSWERED)


@pytest.mark.parametrize("path", PRESET_FILES, ids=lambda p: p.stem)
def test_preset_yaml_runs_on_the_tiny_model(path, tiny, tmp_path):
    base, engine = tiny
    config = JobConfig.from_yaml(path, tiny_overrides(base, tmp_path))
    task = config.task
    prepared = PreprocessRows(config)(_rows())
    generated = GenerateRows(config, run_id="presets", engine_factory=lambda _: engine)(prepared)
    out = OutputShape(config.output.column_names).apply(generated)
    answer = config.output.column_names["text"]  # every preset file names its answer column
    assert answer in out.column_names and "text" not in out.column_names
    rows = {r["id"]: r for r in out.to_pylist()}  # the custom file's id column is sku: same values
    assert set(rows) == {"img", "fox", "morning", "text"}  # one output row per input row
    answered = {k for k, r in rows.items() if r["status"] == "ok"}
    assert answered == ANSWERED[task.preset]
    assert all(isinstance(rows[k][answer], str) and rows[k]["completion_tokens"] > 0 for k in answered)
    assert all(r["error_code"] == "MISSING_INPUT" and "Try " in r["error_message"]
               for k, r in rows.items() if k not in answered)  # fmt: skip
    prompts = dict(zip(prepared.column("id").to_pylist(), prepared.column("prompt").to_pylist(), strict=True))
    inputs = {r["id"]: r for r in _rows().to_pylist()}
    for k in answered:  # the preset's instruction, filled from the row, in the Phi-4-mm prompt
        assert task.instruction({c: inputs[k][c] for c in task.row_columns}) in prompts[k]
        assert (config.prompt.system or "") in prompts[k]
    adapters = {rows[k]["adapter"] for k in answered}
    expected = {"image": {"vision"}, "audio": {"speech"}, "any": {"vision", None}}[task.reads]
    assert adapters == expected
