"""Output commit protocol: atomic parts, output modes, resume and the audit."""

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.io import TMP_DIR, audit, committed_ids, committed_parts, prepare_output, write_part_files
from schemas.job import OutputConfig
from schemas.rows import OUTPUT_SCHEMA


def _rows(ids, status="ok"):
    return pa.Table.from_pylist(
        [{"id": i, "status": status, "prompt_tokens": 10, "completion_tokens": 2} for i in ids],
        schema=OUTPUT_SCHEMA,
    )


def test_parts_are_whole_and_split_by_rows_per_file(tmp_path):
    stats = write_part_files(_rows(["a", "b", "c"]), str(tmp_path), "run1", task_idx=4, rows_per_file=2)
    assert stats.files == ["part-run1-000004-0000.parquet", "part-run1-000004-0001.parquet"]
    assert (stats.rows, stats.prompt_tokens, stats.completion_tokens) == (3, 30, 6)
    assert list((tmp_path / TMP_DIR).iterdir()) == []  # nothing left half-written
    assert pq.read_table(tmp_path).schema.names == OUTPUT_SCHEMA.names  # '_tmp' is ignored by readers
    assert sorted(committed_ids(str(tmp_path)).to_pylist()) == ["a", "b", "c"]


def test_retried_task_replaces_its_own_part(tmp_path):
    write_part_files(_rows(["a"]), str(tmp_path), "run1", 0, 10)
    write_part_files(_rows(["a"]), str(tmp_path), "run1", 0, 10)  # the same task, retried
    assert committed_ids(str(tmp_path)).to_pylist() == ["a"]


def test_a_crash_mid_write_leaves_no_visible_part(tmp_path, monkeypatch):
    import pipelines.io as io

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(io.pq, "write_table", crash)
    with pytest.raises(OSError):
        write_part_files(_rows(["a"]), str(tmp_path), "run1", 0, 10)
    assert committed_parts(str(tmp_path)) == []


def test_output_modes(tmp_path):
    out = str(tmp_path / "out")
    assert len(prepare_output(OutputConfig(path=out, mode="error"))) == 0  # empty output: fine
    write_part_files(_rows(["a", "b"]), out, "run1", 0, 10)
    with pytest.raises(FileExistsError, match="Try output.mode"):
        prepare_output(OutputConfig(path=out, mode="error"))
    assert sorted(prepare_output(OutputConfig(path=out, mode="resume")).to_pylist()) == ["a", "b"]
    assert committed_parts(out)  # resume keeps the parts
    assert len(prepare_output(OutputConfig(path=out, mode="overwrite"))) == 0
    assert committed_parts(out) == []


def test_audit_counts_missing_and_duplicates(tmp_path):
    out = str(tmp_path)
    write_part_files(_rows(["a", "b", None], "error"), out, "r1", 0, 10)
    assert audit(pa.array(["a", "b", None]), out).ok
    missing = audit(pa.array(["a", "b", None, "c"]), out)
    assert (missing.missing_ids, missing.duplicate_ids, missing.ok) == (1, 0, False)
    write_part_files(_rows(["a"]), out, "r2", 0, 10)
    dup = audit(pa.array(["a", "b", None]), out)
    assert (dup.missing_ids, dup.duplicate_ids, dup.ok) == (0, 1, False)
    # an id that is duplicated in the input may appear twice in the output
    assert audit(pa.array(["a", "a", "b", None]), out).ok
