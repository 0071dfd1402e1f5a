"""Which input files a run reads when the output holds rows already, and the manifest's list of them."""

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipelines.incremental import done_among, file_segments, input_files_record, pending_files
from pipelines.output.ids import IdColumn


def _inbox(tmp_path, files: dict[str, list]) -> IdColumn:
    for name, ids in files.items():
        pq.write_table(pa.table({"id": ids}), tmp_path / name, row_group_size=2)
    paths = [str(tmp_path / n) for n in sorted(files)]
    return IdColumn.of_files(pafs.LocalFileSystem(), paths, "id", str(tmp_path))


def test_only_files_with_a_row_not_in_the_output_are_read(tmp_path):
    ids = _inbox(tmp_path, {"1.parquet": ["a", "b", "c"], "2.parquet": [1, 2, 3, 4, 5], "3.parquet": ["z"]})
    files = list(ids.files)
    assert pending_files(ids, pa.array([], pa.string())) == files  # nothing done: every file
    assert pending_files(ids, pa.array(["a", "b", "c", "z"])) == [files[1]]  # ids compare as strings
    # a file a killed run half wrote (its last row group not done) is read again
    assert pending_files(ids, pa.array(["a", "b", "c", "1", "2", "3", "4", "z"])) == [files[1]]
    assert pending_files(ids, pa.array(["a", "b", "c", "1", "2", "3", "4", "5", "z"])) == []
    record = input_files_record(ids, [files[1]])
    assert record == {
        "count": 3,
        "read": 1,
        "rows": 9,
        "files": [
            {"path": files[0], "rows": 3, "read": False},
            {"path": files[1], "rows": 5, "read": True},
            {"path": files[2], "rows": 1, "read": False},
        ],
    }


def test_the_printed_summary_leaves_a_long_file_list_to_the_manifest():
    from jobs.run import SHOWN_FILES, printed

    few = {"input_files": {"count": 2, "read": 1, "rows": 3, "files": [{"path": "a"}, {"path": "b"}]}}
    assert printed(few) == few
    many = {
        "input_files": {"count": SHOWN_FILES + 1, "read": 1, "rows": 9, "files": [{}] * (SHOWN_FILES + 1)}
    }
    assert printed(many)["input_files"] == {"count": SHOWN_FILES + 1, "read": 1, "rows": 9,
                                            "files": f"{SHOWN_FILES + 1} files: see the manifest"}  # fmt: skip
    assert len(many["input_files"]["files"]) == SHOWN_FILES + 1  # the manifest's summary is untouched


def test_segments_are_whole_files_ending_past_segment_rows(tmp_path):
    ids = _inbox(tmp_path, {"a": [1, 2, 3], "b": [4, 5, 6], "c": [7, 8, 9, 10, 11], "d": [12]})
    a, b, c, d = ids.files
    assert file_segments(ids, list(ids.files), 4) == [[a, b], [c], [d]]
    assert file_segments(ids, list(ids.files), 3) == [[a], [b], [c], [d]]
    assert file_segments(ids, [b, d], 3) == [[b], [d]]  # a resumed run's pending files only
    assert file_segments(ids, list(ids.files), 12) == [[a, b, c, d]]  # the input fits: one execution
    assert file_segments(ids, [], 1) == [[]]


def test_a_segments_skip_set_holds_only_its_own_files_done_ids(tmp_path):
    ids = _inbox(tmp_path, {"a": ["x", "y"], "b": [1, 2, 3], "c": ["z"]})
    a, b, c = ids.files
    done = pa.array(["x", "2", "3", "z", "elsewhere"])  # "elsewhere": an output row of no input file
    assert done_among(ids, [b], done).to_pylist() == ["2", "3"]
    assert done_among(ids, [a, c], done).to_pylist() == ["x", "z"]
    assert done_among(ids, [a, b], pa.array([], pa.string())).to_pylist() == []


def test_every_block_gets_the_inputs_merged_schema_whatever_file_it_came_from():
    """Ray reads with the first file's schema of each execution; segments start with different files, so
    every block is given validation's merged schema: a column its file lacks is null, types widened."""
    from pipelines.phi4mm import _select_rows, conform

    merged = pa.schema([("id", pa.int64()), ("prompt", pa.string()), ("title", pa.string())])
    block = pa.table(
        {"id": pa.array([1, 2, 3], pa.int32()), "prompt": ["a", "b", "c"]}
    )  # a file without title
    conformed = conform(block, merged)
    assert conformed.schema == merged and conformed.column("title").null_count == 3
    selected = _select_rows(block, "id", pa.array(["2"]), None, merged)
    assert selected.column("id").to_pylist() == ["1", "3"] and selected.column_names == merged.names
    assert _select_rows(block, "id", pa.array(["2"]), None, None).column_names == ["id", "prompt"]
