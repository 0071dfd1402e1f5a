"""Output commit protocol: atomic parts, bounded commits, output modes and the overwrite swap, stale files,
the one-writer lock, row identity across id types, and the audit."""

import json
import logging
import os
import socket
import subprocess
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import pipelines.output.commit as commit
import pipelines.output.parts as parts
from pipelines.output.audit import audit
from pipelines.output.commit import commit_run, committed_ids, committed_parts
from pipelines.output.ids import id_strings
from pipelines.output.interrupted import finish_interrupted_swaps
from pipelines.output.layout import TMP_DIR, staging_name
from pipelines.output.lock import LOCK_NAME, LockLost, OutputLock, assert_lock_held, read_lock
from pipelines.output.parts import write_part_files
from pipelines.output.prepare import check_output_mode, prepare_output
from pipelines.output.writer import write_in_parts
from schemas.errors import JobError
from schemas.job import OutputConfig
from schemas.rows import OUTPUT_SCHEMA


def _rows(ids, status="ok"):
    return pa.Table.from_pylist(
        [{"id": i, "status": status, "prompt_tokens": 10, "completion_tokens": 2} for i in ids],
        schema=OUTPUT_SCHEMA,
    )


def _out_ids(path):
    return sorted(pq.read_table(path).column("id").to_pylist())  # as a plain pyarrow reader sees it


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
    def crash(table, sink, **kwargs):
        sink.write(b"PAR1 half a file")
        raise OSError("disk full")

    monkeypatch.setattr(parts.pq, "write_table", crash)
    with pytest.raises(OSError):
        write_part_files(_rows(["a"]), str(tmp_path), "run1", 0, 10)
    assert committed_parts(str(tmp_path)) == []
    assert list((tmp_path / TMP_DIR).iterdir()) == []  # the half-written file went too


def test_a_write_task_commits_every_part_rows(tmp_path):
    blocks = [_rows([f"r{i}" for i in range(k, k + 3)]) for k in (0, 3, 6)]
    stats = write_in_parts(iter(blocks), str(tmp_path), "run1", 7, part_rows=4)
    sizes = [pq.read_metadata(tmp_path / name).num_rows for name in stats.files]
    assert sizes == [4, 4, 1] and stats.rows == 9
    assert stats.files == [f"part-run1-000007-{i:04d}.parquet" for i in range(3)]


def test_output_modes(tmp_path):
    out = str(tmp_path / "out")
    assert len(prepare_output(OutputConfig(path=out, mode="error"))) == 0  # empty output: fine
    commit_run(out, "run1", "resume", write_part_files(_rows(["a", "b"]), out, "run1", 0, 10).files)
    with pytest.raises(JobError, match="Try output.mode"):
        prepare_output(OutputConfig(path=out, mode="error"))
    assert sorted(prepare_output(OutputConfig(path=out, mode="resume")).to_pylist()) == ["a", "b"]
    assert committed_parts(out)  # resume keeps the parts
    assert len(prepare_output(OutputConfig(path=out, mode="overwrite"))) == 0
    assert _out_ids(out) == ["a", "b"]  # overwrite too, until its own run is complete


def test_overwrite_is_staged_and_swapped_in_whole(tmp_path):
    out = str(tmp_path / "out")
    commit_run(out, "old", "resume", write_part_files(_rows(["a", "b"]), out, "old", 0, 10).files)
    prepare_output(OutputConfig(path=out, mode="overwrite"))
    write_part_files(_rows(["x", "y", "z"]), out, "new", 0, 2, into=staging_name("new"))
    assert _out_ids(out) == ["a", "b"]  # staged parts are invisible to readers
    assert audit(pa.array(["x", "y", "z"]), f"{out}/{staging_name('new')}").ok
    marker = commit_run(out, "new", "overwrite", [])
    assert _out_ids(out) == ["x", "y", "z"]
    assert marker["replaces"] == ["part-old-000000-0000.parquet"] and len(marker["parts"]) == 2
    assert json.loads((tmp_path / "out" / "_committed-new.json").read_text()) == marker
    assert not (tmp_path / "out" / staging_name("new")).exists()


def test_a_swap_cut_short_is_finished_by_the_next_run(tmp_path, monkeypatch):
    out = str(tmp_path / "out")
    commit_run(out, "old", "resume", write_part_files(_rows(["a"]), out, "old", 0, 10).files)
    write_part_files(_rows(["x"]), out, "new", 0, 10, into=staging_name("new"))
    real_swap = commit.swap
    monkeypatch.setattr(commit, "swap", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt))  # dies mid-swap
    with pytest.raises(KeyboardInterrupt):
        commit_run(out, "new", "overwrite", [])
    assert _out_ids(out) == ["a"]  # the marker is written, nothing moved yet
    monkeypatch.setattr(commit, "swap", real_swap)
    assert prepare_output(OutputConfig(path=out, mode="resume")).to_pylist() == ["x"]
    assert _out_ids(out) == ["x"]


def _stray(out, name="part-00000.parquet"):
    """A part file no run of the output wrote: copied in by hand, or an input file kept there."""
    pq.write_table(pa.table({"id": ["mine"], "prompt": ["keep me"]}), out / name)
    return out / name


def test_an_overwrite_deletes_only_parts_its_output_committed(tmp_path, caplog):
    out = tmp_path / "out"
    commit_run(str(out), "old", "resume", write_part_files(_rows(["a"]), str(out), "old", 0, 10).files)
    stray = _stray(out)
    with pytest.raises(JobError, match="part files no run of this output wrote .*part-00000.parquet"):
        prepare_output(OutputConfig(path=str(out), mode="overwrite"))  # refused before anything is touched
    stray.unlink()
    prepare_output(OutputConfig(path=str(out), mode="overwrite"))
    stray = _stray(out)  # one that appears while the overwrite runs stays, and the log says so
    write_part_files(_rows(["x"]), str(out), "new", 0, 10, into=staging_name("new"))
    with caplog.at_level(logging.WARNING):
        marker = commit_run(str(out), "new", "overwrite", [])
    assert marker["replaces"] == ["part-old-000000-0000.parquet"]
    assert stray.exists() and "1 part files no run of this output wrote stay" in caplog.text
    assert _out_ids(out) == ["mine", "x"]


def test_a_swap_keeps_a_file_an_older_marker_replaced_but_no_run_wrote(tmp_path):
    out = tmp_path / "out"
    write_part_files(_rows(["x"]), str(out), "new", 0, 10, into=staging_name("new"))
    stray = _stray(out)
    marker = {"run_id": "new", "mode": "overwrite", "parts": ["part-new-000000-0000.parquet"],
              "replaces": [stray.name], "committed_at": ""}  # fmt: skip
    (out / "_committed-new.json").write_text(json.dumps(marker))  # as the swap was cut short
    finish_interrupted_swaps(str(out))
    assert stray.exists() and _out_ids(out) == ["mine", "x"]


def test_parts_of_a_run_that_ended_without_its_marker_are_named_when_it_gives_the_lock_back(tmp_path):
    out = tmp_path / "out"
    with OutputLock(str(out), "failed"):
        done = write_in_parts([_rows(["a", "b"])], str(out), "failed", 0, 1, lock_run_id="failed").files
        # the run fails here (exit 3): no commit_run, so no marker of its own
    marker = json.loads((out / "_committed-failed.json").read_text())
    assert (marker["mode"], marker["parts"]) == ("interrupted", done)
    with OutputLock(str(out), "ok"):  # a run that commits writes no second marker when it ends
        commit_run(str(out), "ok", "resume", [])
    assert json.loads((out / "_committed-ok.json").read_text())["mode"] == "resume"
    # a run killed (or still writing) holds the lock: its parts are no strays, and the run that takes its
    # lock over names them
    _write_lock(out, run_id="killed", host="elsewhere", heartbeat=time.time() - 3600)
    killed = write_part_files(_rows(["c"]), str(out), "killed", 0, 10).files
    check_output_mode(OutputConfig(path=str(out), mode="overwrite"))
    with OutputLock(str(out), "new"):
        prepare_output(OutputConfig(path=str(out), mode="overwrite"))
        write_part_files(_rows(["x"]), str(out), "new", 0, 10, into=staging_name("new"))
        assert commit_run(str(out), "new", "overwrite", [])["replaces"] == sorted(done + killed)
    assert _out_ids(out) == ["x"]


def test_stale_temporary_files_are_removed(tmp_path, caplog):
    out = tmp_path / "out"
    write_part_files(_rows(["a"]), str(out), "r1", 0, 10)
    (out / TMP_DIR / "part-dead-000000-0000.parquet.123abc").write_bytes(b"PAR1 half")
    (out / "_staging-dead").mkdir()
    (out / "_staging-dead" / "part-dead-000001-0000.parquet").write_bytes(b"never committed")
    (out / "_lock.0f0f.tmp").write_text("{}")
    with caplog.at_level(logging.WARNING):
        prepare_output(OutputConfig(path=str(out), mode="resume"))
    assert "removed 3 stale temporary files" in caplog.text
    assert list((out / TMP_DIR).iterdir()) == [] and not (out / "_staging-dead").exists()
    assert not (out / "_lock.0f0f.tmp").exists() and _out_ids(out) == ["a"]


@pytest.mark.parametrize(
    "ids,expected",
    [
        (pa.array([1, 2, 30], pa.int32()), ["1", "2", "30"]),
        (pa.array([1, 2, 30], pa.int64()), ["1", "2", "30"]),
        (pa.array([1.0, 2.5, 1e20]), ["1", "2.5", "1e+20"]),
        (pa.array([0.1, 2.0], pa.float32()), ["0.1", "2"]),
        (pa.array(["a", "b"], pa.string()), ["a", "b"]),
        (pa.array(["a", "b"], pa.large_string()), ["a", "b"]),
        (pa.array([b"a", b"b"], pa.binary()), ["a", "b"]),
        (pa.array(["a", "b", "a"]).dictionary_encode(), ["a", "b", "a"]),
    ],
    ids=lambda v: str(v.type) if isinstance(v, pa.Array) else None,
)
def test_ids_of_any_type_compare_the_same_on_write_resume_and_audit(tmp_path, ids, expected):
    assert id_strings(ids).to_pylist() == expected
    out = str(tmp_path / "out")
    write_part_files(_rows(id_strings(ids[:1]).to_pylist()), out, "r1", 0, 10)  # what the pipeline writes
    assert prepare_output(OutputConfig(path=out, mode="resume")).to_pylist() == expected[:1]
    write_part_files(_rows(id_strings(ids[1:]).to_pylist()), out, "r2", 0, 10)
    assert audit(ids, out).ok  # the input's own type against the output's strings


def test_ids_without_a_text_form_are_refused():
    with pytest.raises(pa.ArrowInvalid):
        id_strings(pa.array([b"\xff\xfe"], pa.binary()))


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


def test_audit_of_a_limited_run_checks_exactly_its_ids(tmp_path):
    out = str(tmp_path)
    write_part_files(_rows(["a", "b", "c"]), out, "r1", 0, 10)
    inputs = pa.array(["a", "b", "c", "d"])
    first_two = audit(inputs, out, run_ids=inputs[:2])
    assert first_two.ok and (first_two.input_rows, first_two.output_rows) == (2, 2)
    assert not audit(inputs, out, run_ids=inputs[2:]).ok  # "d" is missing
    write_part_files(_rows(["stray"]), out, "r2", 0, 10)
    stray = audit(inputs, out, run_ids=inputs[:2])
    assert (stray.unexpected_ids, stray.ok) == (1, False)  # a row whose id is not in the input at all


def test_one_writer_per_output(tmp_path):
    out = str(tmp_path / "out")
    with OutputLock(out, "first"):
        held = read_lock(out)
        assert (held.run_id, held.pid, held.host) == ("first", os.getpid(), socket.gethostname())
        with pytest.raises(JobError, match=rf"output {out} is being written by run first .*Try again"):
            OutputLock(out, "second").acquire()
        assert_lock_held(out, "first")
        with pytest.raises(LockLost):
            assert_lock_held(out, "second")
    assert read_lock(out) is None  # released
    OutputLock(out, "second").acquire().release()


def _write_lock(out, **fields):
    info = {"run_id": "dead", "host": socket.gethostname(), "pid": 1, "started": time.time()}
    info |= {"heartbeat": time.time()} | fields
    (out / LOCK_NAME).write_text(json.dumps(info))


def test_a_lock_whose_run_died_is_taken_over_and_logged(tmp_path, caplog):
    out = tmp_path / "out"
    out.mkdir()
    ended = subprocess.Popen(["true"])
    ended.wait()
    _write_lock(out, pid=ended.pid)  # this host, a process that has ended
    with caplog.at_level(logging.WARNING), OutputLock(str(out), "next") as lock:
        assert lock.took_over.run_id == "dead" and read_lock(str(out)).run_id == "next"
    assert "taking over the lock" in caplog.text and f"process {ended.pid}" in caplog.text
    _write_lock(out, host="elsewhere", heartbeat=time.time() - 3600)  # another host, silent for an hour
    with OutputLock(str(out), "later") as lock:
        assert lock.took_over.host == "elsewhere"
    _write_lock(out, host="elsewhere")  # another host, fresh heartbeat: still running
    with pytest.raises(JobError, match="being written by run dead"):
        OutputLock(str(out), "again").acquire()


def test_the_heartbeat_keeps_the_lock_fresh(tmp_path):
    out = str(tmp_path / "out")
    with OutputLock(out, "r1", heartbeat_s=0.05):
        first = read_lock(out).heartbeat
        time.sleep(0.3)
        assert read_lock(out).heartbeat > first


def test_a_run_that_lost_its_lock_commits_nothing(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    _write_lock(out, run_id="newer")
    with pytest.raises(LockLost, match="no longer holds the lock"):
        write_part_files(_rows(["a"]), str(out), "older", 0, 10, lock_run_id="older")
    assert committed_parts(str(out)) == [] and list((out / TMP_DIR).iterdir()) == []
