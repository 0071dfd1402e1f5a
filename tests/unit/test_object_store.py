"""The output protocol on an object store (tests/s3_server.py, or PHI4MM_TEST_S3_ENDPOINT): parts uploaded
under their final names with no rename, an upload that fails leaves nothing, the commit markers correct a
listing that lags, the store's throttling and resets are retried, one writer per output, and nothing
secret in what is written or pickled."""

import json
import pickle

import pyarrow as pa
import pyarrow.fs as pafs
import pytest

from pipelines.output.audit import audit
from pipelines.output.commit import commit_run, committed_ids, write_manifest
from pipelines.output.layout import staging_name
from pipelines.output.lock import OutputLock
from pipelines.output.prepare import check_run_id_unused
from pipelines.output.writer import write_in_parts
from schemas import storage
from schemas.errors import JobError
from schemas.job import StorageConfig
from schemas.rows import OUTPUT_SCHEMA
from tests.s3_server import SECRET_KEY


def _rows(ids):
    return pa.Table.from_pylist(
        [{"id": i, "status": "ok", "text": f"about {i}"} for i in ids], schema=OUTPUT_SCHEMA
    )


@pytest.fixture
def out(s3):
    storage.use(s3.storage)
    yield s3.url("out")
    storage.use(None)


def _faults(s3):
    if s3.server is None:
        pytest.skip("fault knobs need the project's test server (PHI4MM_TEST_S3_ENDPOINT is a real store)")
    return s3.server.faults


def test_parts_are_uploaded_under_their_final_names_without_copies(s3, out):
    if s3.server:
        s3.server.clear_requests()
    stats = write_in_parts([_rows(["a", "b", "c"])], out, "r1", 0, 2)
    assert stats.files == ["part-r1-000000-0000.parquet", "part-r1-000000-0001.parquet"]
    assert s3.keys("out/") == [f"out/{name}" for name in stats.files]
    assert sorted(committed_ids(out).to_pylist()) == ["a", "b", "c"]
    if s3.server:  # no temporary object, no copy (the rename an object store does not have)
        touched = [key for _, key, _, _ in s3.server.requests]
        assert not any("_tmp" in key for key in touched)
        assert not any(
            "x-amz-copy-source" in {h.lower() for h in headers} for *_, headers in s3.server.requests
        )


def test_a_part_whose_upload_fails_leaves_no_object(s3, out):
    faults = _faults(s3)
    storage.use(StorageConfig(s3_endpoint=s3.endpoint, max_attempts=2))
    faults.reset(100, "out/", "PUT partNumber")  # every attempt of every part upload is cut off
    with pytest.raises(OSError):
        write_in_parts([_rows(["a", "b"])], out, "r1", 0, 10)
    faults.reset(0)
    assert s3.keys("out/") == []  # the unfinished multipart upload is invisible to readers
    assert committed_ids(out).to_pylist() == []


def test_throttling_and_resets_are_retried(s3, out):
    faults = _faults(s3)
    faults.throttle(2, "out/", "PUT partNumber")
    stats = write_in_parts([_rows(["a"])], out, "r1", 0, 10)
    faults.reset(2, "out/", "POST uploadId")
    stats.add(write_in_parts([_rows(["b"])], out, "r1", 1, 10))
    assert faults.throttle_left == faults.reset_left == 0  # the faults did happen
    assert sorted(committed_ids(out).to_pylist()) == ["a", "b"]


def test_markers_correct_a_listing_that_lags(s3, out):
    faults = _faults(s3)
    first = write_in_parts([_rows(["a", "b"])], out, "r1", 0, 10)
    commit_run(out, "r1", "resume", first.files)
    s3.server.age(7200)  # written long ago: listed
    faults.list_lag_s, faults.prefix = 3600.0, "out/"  # from now on the listing shows the past hour late
    second = write_in_parts([_rows(["c"])], out, "r2", 0, 10)
    fs, root = storage.filesystem_for(out)
    listed = {i.base_name for i in fs.get_file_info(pafs.FileSelector(root))}
    assert second.files[0] not in listed  # the lag is real: a plain listing misses the new part
    # the run's audit knows its own parts; once its marker is written, resume and later audits know them
    assert audit(pa.array(["a", "b", "c"]), out, known_parts=second.files).ok
    assert sorted(committed_ids(out).to_pylist()) == ["a", "b"]
    commit_run(out, "r2", "resume", second.files)
    assert sorted(committed_ids(out).to_pylist()) == ["a", "b", "c"]
    # an overwrite swapped in: the old parts are still listed (deletes lag too) but no longer count
    staged = write_in_parts([_rows(["x"])], out, "r3", 0, 10, into=staging_name("r3"))
    commit_run(out, "r3", "overwrite", staged.files)
    assert first.files[0] in {i.base_name for i in fs.get_file_info(pafs.FileSelector(root))}
    assert committed_ids(out).to_pylist() == ["x"]
    assert audit(pa.array(["x"]), out).ok


def test_a_killed_runs_parts_count_where_the_listing_lags(s3, out):
    """A resume run commits parts as it goes and its marker only at the end: one killed before has none.
    The run that takes its lock over names its parts in a marker, found by name, not by the listing."""
    faults = _faults(s3)
    faults.list_lag_s, faults.prefix = 3600.0, "out/"  # the listing shows the past hour late
    killed = write_in_parts([_rows(["a", "b", "c"])], out, "killed", 0, 1)
    fs, root = storage.filesystem_for(out)
    assert not [i for i in fs.get_file_info(pafs.FileSelector(root, allow_not_found=True))
                if i.base_name.startswith("part-")]  # fmt: skip
    assert committed_ids(out).to_pylist() == []  # what resume would have skipped: nothing
    lock = {"run_id": "killed", "host": "elsewhere", "pid": 1, "started": 0.0, "heartbeat": 0.0}
    with s3.fs.open_output_stream(f"{s3.name}/out/_lock") as f:  # its heartbeat stopped long ago
        f.write(json.dumps(lock).encode())
    with OutputLock(out, "next") as taken:
        assert taken.took_over.run_id == "killed"
        assert sorted(committed_ids(out).to_pylist()) == ["a", "b", "c"]
    marker = json.loads(s3.fs.open_input_stream(f"{s3.name}/out/_committed.json").read())["runs"][0]
    assert (marker["run_id"], marker["mode"], marker["parts"]) == ("killed", "interrupted", killed.files)
    with pytest.raises(JobError, match="already wrote"):
        check_run_id_unused(out, "killed")


def test_one_writer_per_output_on_the_store(s3, out):
    with OutputLock(out, "r1"):
        with pytest.raises(JobError, match="is being written by run r1"):
            OutputLock(out, "r2").acquire()
    with OutputLock(out, "r2"):  # released: the next run takes it
        pass


def test_nothing_secret_is_pickled_or_accepted_in_a_uri(s3, out):
    fs, _ = storage.filesystem_for(out)
    # what Ray ships to the writer actor (its arguments: the job's storage settings) and to read tasks
    for blob in (pickle.dumps(s3.storage), pickle.dumps(fs)):
        assert SECRET_KEY.encode() not in blob
    with pytest.raises(JobError, match="credentials never|options or credentials"):
        storage.filesystem_for(f"s3://{s3.name}/out?secret_key={SECRET_KEY}")
    assert SECRET_KEY not in storage.redact(f"s3://user:{SECRET_KEY}@bucket/x?token={SECRET_KEY}")
    with pytest.raises(ValueError, match="credentials never go in the config"):
        StorageConfig(s3_endpoint=f"http://key:{SECRET_KEY}@127.0.0.1:9000")
    write_manifest(out, "r1", {"output": out})
    manifest = s3.fs.open_input_stream(f"{s3.name}/out/_run-r1.json").read().decode()
    assert json.loads(manifest) == {"output": out} and SECRET_KEY not in manifest
