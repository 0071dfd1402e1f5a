"""An input directory that keeps receiving Parquet files, run three times with files added in between
(as a cron job or a scheduled RayJob would): every row is answered exactly once, each run reads only the
new files, and each manifest lists the files it saw; and a run in segments (one Ray Data execution per
group of files). Real Ray and vLLM on the tiny model, text rows."""

import json

import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.phi4mm import run_pipeline
from tests.helpers import MEDIA, make_config


def test_three_runs_over_a_growing_directory_answer_every_row_once(local_ray, tiny_model, tmp_path):
    inbox, out = tmp_path / "inbox", tmp_path / "out"
    inbox.mkdir()
    config = make_config(
        tiny_model,
        tmp_path,
        input={"path": str(inbox), "columns": {"image": None, "audio": None}},
        output={"path": str(out), "mode": "resume"},
        sampling={"max_tokens": 2},
    )

    def drop(name: str, ids: list[str]) -> None:
        (inbox / name).parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.table({"id": ids, "prompt": [f"Say {i}." for i in ids]}), inbox / name)

    drop("2026-12-01.parquet", ["a1", "a2", "a3"])
    first = run_pipeline(config, run_id="night-1")
    drop("2026-12-02.parquet", ["b1", "b2"])
    second = run_pipeline(config, run_id="night-2")
    drop("2026-12-03/part-0.parquet", ["c1", "c2"])  # a new sub-directory too
    drop("2026-12-03/part-1.parquet", ["c3", "c4"])
    third = run_pipeline(config, run_id="night-3")

    runs = [first, second, third]
    assert [r["rows_written"] for r in runs] == [3, 2, 4]
    assert [r["rows_skipped_already_done"] for r in runs] == [0, 3, 5]
    assert all(r["audit"]["ok"] and r["status"] == {"ok": r["rows_written"]} for r in runs)
    manifests = [json.loads((out / f"_run-{r['run_id']}.json").read_text())["input_files"] for r in runs]
    assert [(m["count"], m["read"], m["rows"]) for m in manifests] == [(1, 1, 3), (2, 1, 5), (4, 2, 9)]
    read_last = [f["path"].rsplit("/", 2)[-2:] for f in manifests[2]["files"] if f["read"]]
    assert read_last == [["2026-12-03", "part-0.parquet"], ["2026-12-03", "part-1.parquet"]]
    rows = pq.read_table(out).select(["id", "run_id"]).to_pylist()
    assert sorted(r["id"] for r in rows) == [
        "a1",
        "a2",
        "a3",
        "b1",
        "b2",
        "c1",
        "c2",
        "c3",
        "c4",
    ]  # once each
    assert {r["id"]: r["run_id"] for r in rows}["b2"] == "night-2"


def test_a_run_in_segments_answers_every_row_once_one_execution_each(local_ray, tiny_model, tmp_path):
    """A --limit run, then the rest in segments of whole files: the file it half did is a segment whose
    skip set is its own done ids; each segment is its own execution (its own GPU actor and engine)."""
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    ids = {"0.parquet": ["a", "b", "c"], "1.parquet": ["d", "e"], "2.parquet": ["f", "g", "h"]}
    for name, rows in ids.items():
        pq.write_table(pa.table({"id": rows, "prompt": [f"Say {i}." for i in rows]}), inbox / name)

    def config(**inputs):
        return make_config(
            tiny_model, tmp_path, input={"path": str(inbox), "columns": {"image": None, "audio": None}, **inputs},
            output={"path": str(tmp_path / "out"), "mode": "resume", "commit_every_rows": 2},
            sampling={"max_tokens": 2}, resources={"segment_rows": 2},
        )  # fmt: skip

    first = run_pipeline(config(limit=4), run_id="first-four")  # a, b, c and d
    rest = run_pipeline(config(), run_id="segments")
    assert first["rows_written"] == 4 and rest["rows_written"] == 4 and rest["rows_skipped_already_done"] == 4
    assert rest["audit"]["ok"] and rest["status"] == {"ok": 4}
    # 0.parquet is done and not read; 1.parquet (d done, e not) and 2.parquet are a segment each, run one
    # after the other, each by a GPU actor of its own whose engine answered that segment's rows
    assert sorted(e["requests"] for e in rest["engines"].values()) == [1, 3]
    written = sorted(pq.read_table(tmp_path / "out").column("id").to_pylist())
    assert written == sorted(i for rows in ids.values() for i in rows)  # once each
    again = run_pipeline(config(), run_id="segments-again")  # a re-run finds every row done
    assert again["rows_written"] == 0 and again["rows_skipped_already_done"] == 8 and again["audit"]["ok"]


def test_error_rows_retried_into_the_same_output_keep_one_row_per_id(local_ray, tiny_model, tmp_path):
    """An image that was missing (MEDIA_NOT_FOUND) is there the next night: --retry-errors MEDIA_NOT_FOUND
    runs those rows again with the new ones, each new row replacing its old one in one commit; another
    code's row stays; a second retry finds nothing to do and starts no engine."""
    inbox, media, out = tmp_path / "inbox", tmp_path / "media", tmp_path / "out"
    inbox.mkdir()
    media.mkdir()

    def drop(name: str, rows: list[tuple[str, str | None, str | None]]) -> None:
        ids, images, prompts = map(list, zip(*rows, strict=True))
        pq.write_table(pa.table({"id": ids, "image": images, "prompt": prompts}), inbox / name)

    drop("1.parquet", [("t1", None, "Say 1."), ("m1", "late.jpg", "What is it?"), ("t2", None, "Say 2."),
                       ("e1", None, None), ("m2", "late.jpg", None), ("t3", None, "Say 3.")])  # fmt: skip

    def config(**output):
        return make_config(
            tiny_model, tmp_path, input={"path": str(inbox), "media_root": str(media), "columns": {"audio": None}},
            output={"path": str(out), "mode": "resume", "commit_every_rows": 2, **output},
            sampling={"max_tokens": 2}, engine={"init_hook": "jobs.tiny_vision:shrink_siglip"},
        )  # fmt: skip

    first = run_pipeline(config(), run_id="night-1")
    assert first["error_codes"] == {"MEDIA_NOT_FOUND": 2, "MISSING_INPUT": 1} and first["audit"]["ok"]
    (media / "late.jpg").write_bytes((MEDIA / "cat.jpg").read_bytes())  # the image has come
    drop("2.parquet", [("t4", None, "Say 4.")])  # and a new row
    retry = config(retry_errors=["MEDIA_NOT_FOUND"])
    second = run_pipeline(retry, run_id="night-2")
    assert (second["rows_written"], second["rows_retried"], second["rows_skipped_already_done"]) == (3, 2, 4)
    assert second["status"] == {"ok": 3} and second["audit"]["ok"] and second["committed"]
    rows = {r["id"]: r for r in pq.read_table(out).to_pylist()}  # as a plain reader: once each
    assert len(pq.read_table(out)) == len(rows) == 7
    assert {i: (r["status"], r["run_id"]) for i, r in rows.items()} == {
        "t1": ("ok", "night-1"), "t2": ("ok", "night-1"), "t3": ("ok", "night-1"),
        "e1": ("error", "night-1"),  # MISSING_INPUT was not chosen
        "m1": ("ok", "night-2"), "m2": ("ok", "night-2"), "t4": ("ok", "night-2"),
    }  # fmt: skip
    assert rows["m1"]["num_images"] == 1 and rows["e1"]["error_code"] == "MISSING_INPUT"
    marker = json.loads((out / "_committed-night-2.json").read_text())
    assert marker["mode"] == "retry" and marker["replaces"] and marker["retried"]["rows"] == 2
    again = run_pipeline(retry, run_id="night-3")  # nothing left to retry, nothing new
    assert again["nothing_to_do"] and again["rows_written"] == 0 and again["engines"] == {}
    assert again["rows_skipped_already_done"] == 7 and again["audit"]["ok"]
    assert len(pq.read_table(out)) == 7
