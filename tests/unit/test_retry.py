"""Error rows run again into the same output (``pipelines.output.retry``): which rows, the staged rewrite of the
parts holding them, one commit that replaces them, and a retry killed before or during its commit."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import pipelines.output.retry as retry_mod
from pipelines.output.audit import audit, audit_ids
from pipelines.output.commit import commit_run, committed_ids, committed_parts
from pipelines.output.layout import staging_name
from pipelines.output.parts import write_part_files
from pipelines.output.prepare import prepare_output
from pipelines.output.retry import commit_retry, parts_after, retry_of, stage_kept_rows
from schemas.job import OutputConfig
from schemas.rows import OUTPUT_SCHEMA

IDS = ["a", "b", "c", "d", "e", "f"]
FIRST = {"a": None, "b": "MEDIA_NOT_FOUND", "c": None, "d": "MEDIA_FETCH_TIMEOUT", "e": "MEDIA_NOT_FOUND",
         "f": "MEDIA_NOT_FOUND"}  # fmt: skip


def _rows(codes: dict, run_id: str) -> pa.Table:
    rows = [
        {"id": i, "status": "error" if code else "ok", "error_code": code, "run_id": run_id}
        for i, code in codes.items()
    ]
    return pa.Table.from_pylist(rows, schema=OUTPUT_SCHEMA)


def _first_run(out: str) -> list[str]:
    """Three parts: [a b c], [d e], [f]; b, e and f are MEDIA_NOT_FOUND, d MEDIA_FETCH_TIMEOUT."""
    files = []
    for index, ids in enumerate((IDS[:3], IDS[3:5], IDS[5:])):
        files += write_part_files(_rows({i: FIRST[i] for i in ids}, "first"), out, "first", index, 10).files
    commit_run(out, "first", "resume", files)
    return files


def _reader_view(out) -> dict[str, list]:
    """What a plain pyarrow reader of the directory sees: id -> [(status, error_code, run_id), ...]."""
    seen: dict[str, list] = {}
    for r in pq.read_table(out).to_pylist():
        seen.setdefault(r["id"], []).append((r["status"], r["error_code"], r["run_id"]))
    return seen


def _retry(out: str, codes=("MEDIA_NOT_FOUND",), run_ids=IDS):
    config = OutputConfig(path=out, mode="resume", retry_errors=list(codes))
    return retry_of(config, prepare_output(config), pa.array(run_ids))


def _stage(out: str, retry, run_id="again", new=None) -> list[str]:
    """The retry run's own rows (b ok now, e an error again, f ok) staged, and the kept rows."""
    new = new or {"b": None, "e": "MEDIA_NOT_FOUND", "f": None}
    stats = write_part_files(_rows(new, run_id), out, run_id, 0, 10, into=staging_name(run_id))
    return stats.files + stage_kept_rows(out, run_id, retry)


def test_a_retry_replaces_each_chosen_error_row_in_one_commit(tmp_path):
    out = str(tmp_path / "out")
    first = _first_run(out)
    retry = _retry(out)
    schema = pq.read_schema(tmp_path / "out" / first[0])
    assert {k: v.to_pylist() for k, v in retry.parts.items()} == {
        first[0]: ["b"],
        first[1]: ["e"],
        first[2]: ["f"],
    }
    staged = _stage(out, retry)
    assert {i: len(v) for i, v in _reader_view(out).items()} == dict.fromkeys(IDS, 1)  # nothing seen yet
    assert _reader_view(out)["b"] == [("error", "MEDIA_NOT_FOUND", "first")]
    assert audit_ids(pa.array(IDS), parts_after(out, "again", retry, staged)).ok  # the output to be
    marker = commit_retry(out, "again", staged, retry)

    assert marker["mode"] == "retry" and marker["replaces"] == sorted(first)
    assert marker["retried"] == {"codes": ["MEDIA_NOT_FOUND"], "rows": 3}
    assert len(marker["parts"]) == 3  # the new rows, and [a c] and [d] rewritten; [f] had nothing to keep
    view = _reader_view(out)
    assert view == {
        "a": [("ok", None, "first")],
        "b": [("ok", None, "again")],
        "c": [("ok", None, "first")],
        "d": [("error", "MEDIA_FETCH_TIMEOUT", "first")],  # another code: kept as it was
        "e": [("error", "MEDIA_NOT_FOUND", "again")],  # failed again: one row, the new one
        "f": [("ok", None, "again")],
    }
    assert sorted(committed_ids(out).to_pylist()) == IDS and audit(pa.array(IDS), out).ok
    kept = [p for p in committed_parts(out) if "-999999-" in p]
    # the rewritten parts keep the columns and the datasets features
    assert len(kept) == 2 and all(pq.read_schema(p).equals(schema, check_metadata=True) for p in kept)
    assert not (tmp_path / "out" / staging_name("again")).exists()
    assert json.loads((tmp_path / "out" / "_committed.json").read_text())["runs"][-1] == marker
    # run again: only e still has the code; d's code was not chosen
    assert _retry(out).ids.to_pylist() == ["e"]
    assert _retry(out, codes=["MEDIA_FETCH_TIMEOUT", "IMAGE_DECODE_ERROR"]).ids.to_pylist() == ["d"]
    assert _retry(out, codes=["IMAGE_DECODE_ERROR"]) is None  # none: a plain resume


def test_only_the_runs_own_ids_are_retried(tmp_path):
    """A --limit run answers for its first ids only: an error row outside them stays as it is."""
    out = str(tmp_path / "out")
    _first_run(out)
    assert _retry(out, run_ids=IDS[:4]).ids.to_pylist() == ["b"]


def test_the_audit_before_the_commit_sees_rows_it_would_lose_or_double(tmp_path):
    out = str(tmp_path / "out")
    _first_run(out)
    retry = _retry(out)
    staging = staging_name("again")
    new = write_part_files(_rows({"b": None}, "again"), out, "again", 0, 10, into=staging).files
    # only b's new row staged, the parts it replaces not rewritten: every other row would be lost
    check = audit_ids(pa.array(IDS), parts_after(out, "again", retry, new))
    assert not check.ok and (check.missing_ids, check.output_rows) == (5, 1)
    twice = new + write_part_files(_rows({"b": None}, "again"), out, "again", 1, 10, into=staging).files
    check = audit_ids(
        pa.array(IDS), parts_after(out, "again", retry, twice + stage_kept_rows(out, "again", retry))
    )
    assert not check.ok and (check.missing_ids, check.duplicate_ids) == (2, 1)  # e and f missing, b twice


def test_a_retry_killed_before_its_marker_leaves_every_old_row(tmp_path):
    out = str(tmp_path / "out")
    _first_run(out)
    before = _reader_view(out)
    _stage(out, _retry(out))  # killed here: parts staged, no marker
    assert _reader_view(out) == before
    retry = _retry(out)  # the next run: the staged parts removed, the same rows to retry
    assert not (tmp_path / "out" / staging_name("again")).exists() and _reader_view(out) == before
    assert retry.ids.to_pylist() == ["b", "e", "f"]
    commit_retry(out, "later", _stage(out, retry, "later"), retry)
    assert sorted(committed_ids(out).to_pylist()) == IDS and audit(pa.array(IDS), out).ok


def test_a_retry_killed_mid_swap_is_finished_by_the_next_run(tmp_path, monkeypatch):
    out = str(tmp_path / "out")
    _first_run(out)
    retry = _retry(out)
    staged = _stage(out, retry)

    def one_move_then_die(fs, root, marker):
        name = marker["parts"][0]
        fs.move(f"{root}/{staging_name(marker['run_id'])}/{name}", f"{root}/{name}")
        raise KeyboardInterrupt

    monkeypatch.setattr(retry_mod, "swap", one_move_then_die)
    with pytest.raises(KeyboardInterrupt):
        commit_retry(out, "again", staged, retry)
    assert all(len(v) >= 1 for v in _reader_view(out).values())  # mid-swap: some rows twice, none gone
    monkeypatch.undo()
    done = prepare_output(OutputConfig(path=out, mode="resume"))  # the next run rolls the swap forward
    assert sorted(done.to_pylist()) == IDS
    view = _reader_view(out)
    assert {i: len(v) for i, v in view.items()} == dict.fromkeys(IDS, 1)
    assert view["b"] == [("ok", None, "again")] and audit(pa.array(IDS), out).ok
