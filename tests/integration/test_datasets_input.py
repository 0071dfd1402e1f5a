"""A Hugging Face datasets export as users have it: ``Dataset.to_parquet()`` of local files, so no id
column and media structs that hold absolute paths. Run with ``input.derived_ids`` and the files' directory
in ``input.allowed_media_roots``: a --limit run, the rest resumed, then a run with nothing to do; one
output row per input row, audit ok. Real Ray and vLLM on the tiny model."""

import pyarrow.parquet as pq

from pipelines.phi4mm import run_pipeline
from tests.helpers import MEDIA, make_config


def _export(path, images, audios, prompts):
    import datasets

    data = {
        "image": [str(MEDIA / i) if i else None for i in images],
        "audio": [str(MEDIA / a) if a else None for a in audios],
        "prompt": prompts,
    }
    ds = (
        datasets.Dataset.from_dict(data)
        .cast_column("image", datasets.Image())
        .cast_column("audio", datasets.Audio())
    )
    ds.to_parquet(str(path))


def test_a_datasets_export_of_local_files_runs_with_derived_ids_and_resumes(local_ray, tiny_model, tmp_path):
    hf = tmp_path / "hf"
    hf.mkdir()
    _export(hf / "train.parquet", ["cat.jpg", None, "logo.png", None], [None, "fox.wav", None, None],
            ["What is this?", "Transcribe.", "Describe it.", "Say hello."])  # fmt: skip
    _export(hf / "validation.parquet", [None, "rocket.jpg"], ["question.flac", None], ["Answer.", "Caption."])
    assert "id" not in pq.read_schema(hf / "train.parquet").names
    assert pq.read_table(hf / "train.parquet").column("image")[0]["path"].as_py() == str(MEDIA / "cat.jpg")

    def config(**inputs):
        return make_config(
            tiny_model, tmp_path,
            input={"path": str(hf), "derived_ids": True, "media_root": str(hf),
                   "allowed_media_roots": [str(MEDIA)], **inputs},
            output={"path": str(tmp_path / "out"), "mode": "resume"}, sampling={"max_tokens": 2},
        )  # fmt: skip

    first = run_pipeline(config(limit=3), run_id="first-three")
    rest = run_pipeline(config(), run_id="rest")
    again = run_pipeline(config(), run_id="again")

    assert (first["rows_written"], rest["rows_written"], again["rows_written"]) == (3, 3, 0)
    assert rest["rows_skipped_already_done"] == 3 and again["nothing_to_do"]
    assert all(r["audit"]["ok"] for r in (first, rest, again)) and rest["audit"]["output_rows"] == 6
    rows = pq.read_table(tmp_path / "out").select(["id", "status", "num_images", "num_audios", "run_id"])
    by_id = {r["id"]: r for r in rows.to_pylist()}
    assert sorted(by_id) == [f"train.parquet:{i}" for i in range(4)] + [
        "validation.parquet:0",
        "validation.parquet:1",
    ]
    assert len(by_id) == rows.num_rows  # one row each
    assert {r["status"] for r in by_id.values()} == {"ok"}, by_id  # the absolute paths were read
    assert [by_id[f"train.parquet:{i}"]["run_id"] for i in range(4)] == ["first-three"] * 3 + ["rest"]
    assert (by_id["train.parquet:0"]["num_images"], by_id["train.parquet:1"]["num_audios"]) == (1, 1)
    assert (by_id["validation.parquet:0"]["num_audios"], by_id["validation.parquet:1"]["num_images"]) == (
        1,
        1,
    )
