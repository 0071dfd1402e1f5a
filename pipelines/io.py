"""Parquet in and out, with the guarantees users rely on:

- output part files appear atomically (written under ``_tmp/``, then moved into place), so a reader
  never sees a half-written file and a crashed run leaves only whole files;
- ``resume`` skips input ids that committed parts already hold, so a re-run never duplicates rows;
- an audit after the write checks that every input row has exactly one output row.
"""

from __future__ import annotations

import json
import uuid
from collections import Counter
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from schemas.job import OutputConfig
from schemas.rows import OUTPUT_SCHEMA

PART_PREFIX = "part-"
TMP_DIR = "_tmp"  # pyarrow and Ray ignore names starting with '_' or '.' when reading a directory


def _fs_and_path(uri: str) -> tuple[pafs.FileSystem, str]:
    return pafs.FileSystem.from_uri(uri)


def committed_parts(uri: str) -> list[str]:
    fs, root = _fs_and_path(uri)
    info = fs.get_file_info(root)
    if info.type == pafs.FileType.NotFound:
        return []
    selector = pafs.FileSelector(root, recursive=False)
    return sorted(
        f.path for f in fs.get_file_info(selector)
        if f.type == pafs.FileType.File and f.base_name.startswith(PART_PREFIX) and f.base_name.endswith(".parquet")
    )  # fmt: skip


def committed_ids(uri: str) -> pa.Array:
    """Ids of every row in committed output parts (empty when there are none)."""
    parts = committed_parts(uri)
    if not parts:
        return pa.array([], pa.string())
    fs, _ = _fs_and_path(uri)
    table = pads.dataset(parts, filesystem=fs, format="parquet").to_table(columns=["id"])
    return table.column("id").combine_chunks()


def prepare_output(config: OutputConfig) -> pa.Array:
    """Apply the output mode before a run; returns the ids to skip (non-empty only when resuming)."""
    fs, root = _fs_and_path(config.path)
    parts = committed_parts(config.path)
    if parts and config.mode == "error":
        raise FileExistsError(
            f"output {config.path} already holds {len(parts)} part files. "
            "Try output.mode: resume (skip rows already done) or overwrite (start again)."
        )
    if parts and config.mode == "overwrite":
        for part in parts:
            fs.delete_file(part)
    fs.create_dir(root, recursive=True)
    return committed_ids(config.path) if config.mode == "resume" else pa.array([], pa.string())


@dataclass
class WriteStats:
    rows: int = 0
    files: list[str] = field(default_factory=list)
    status: Counter = field(default_factory=Counter)
    error_codes: Counter = field(default_factory=Counter)
    prompt_tokens: int = 0
    completion_tokens: int = 0

    def add(self, other: WriteStats) -> None:
        self.rows += other.rows
        self.files += other.files
        self.status.update(other.status)
        self.error_codes.update(other.error_codes)
        self.prompt_tokens += other.prompt_tokens
        self.completion_tokens += other.completion_tokens

    @classmethod
    def of_table(cls, table: pa.Table) -> WriteStats:
        def counts(column: str) -> Counter:
            values = table.column(column).drop_null().to_pylist()
            return Counter(values)

        return cls(
            rows=table.num_rows,
            status=counts("status"),
            error_codes=counts("error_code"),
            prompt_tokens=int(pc.sum(table.column("prompt_tokens")).as_py() or 0),
            completion_tokens=int(pc.sum(table.column("completion_tokens")).as_py() or 0),
        )


def write_part_files(table: pa.Table, uri: str, run_id: str, task_idx: int, rows_per_file: int) -> WriteStats:
    """Write a table as one or more part files, each made visible by an atomic move."""
    fs, root = _fs_and_path(uri)
    fs.create_dir(f"{root}/{TMP_DIR}", recursive=True)
    table = table.cast(OUTPUT_SCHEMA)
    stats = WriteStats.of_table(table)
    for chunk_idx, offset in enumerate(range(0, table.num_rows, rows_per_file)):
        # A retried task reuses its name, so a retry replaces its own earlier file instead of adding one.
        name = f"{PART_PREFIX}{run_id}-{task_idx:06d}-{chunk_idx:04d}.parquet"
        tmp = f"{root}/{TMP_DIR}/{name}.{uuid.uuid4().hex}"
        with fs.open_output_stream(tmp) as sink:
            pq.write_table(table.slice(offset, rows_per_file), sink, compression="zstd")
        fs.move(tmp, f"{root}/{name}")
        stats.files.append(name)
    return stats


def write_manifest(uri: str, run_id: str, summary: dict) -> None:
    fs, root = _fs_and_path(uri)
    with fs.open_output_stream(f"{root}/_run-{run_id}.json") as sink:
        sink.write(json.dumps(summary, indent=1, default=str).encode())


@dataclass
class Audit:
    input_rows: int
    output_rows: int
    missing_ids: int
    duplicate_ids: int

    @property
    def ok(self) -> bool:
        return self.output_rows == self.input_rows and not self.missing_ids and not self.duplicate_ids


def audit(input_ids: pa.Array | None, output_uri: str) -> Audit:
    """Compare input ids with every committed output row: each id appears in the output as often as in
    the input (so exactly once for unique ids). Without input ids (a --limit run) only size is known."""
    out_ids = committed_ids(output_uri)
    if input_ids is None:
        return Audit(input_rows=len(out_ids), output_rows=len(out_ids), missing_ids=0, duplicate_ids=0)
    # Rows without an id still get an output row (MISSING_ID) with a null id: nulls count as one group
    # (joins never match nulls, so they get a key no real id can have).
    input_ids, out_ids = (pc.fill_null(ids.cast(pa.string()), "\x00null") for ids in (input_ids, out_ids))
    in_counts = pa.table({"id": input_ids}).group_by("id").aggregate([([], "count_all")])
    out_counts = pa.table({"id": out_ids}).group_by("id").aggregate([([], "count_all")])
    joined = in_counts.join(out_counts, "id", join_type="full outer", left_suffix="_in", right_suffix="_out")
    n_in = pc.fill_null(joined.column("count_all_in"), 0)
    n_out = pc.fill_null(joined.column("count_all_out"), 0)
    diff = pc.subtract(n_out, n_in)
    missing = int(pc.sum(pc.if_else(pc.less(diff, 0), pc.negate(diff), 0)).as_py() or 0)
    duplicates = int(pc.sum(pc.if_else(pc.greater(diff, 0), diff, 0)).as_py() or 0)
    return Audit(
        input_rows=len(input_ids), output_rows=len(out_ids), missing_ids=missing, duplicate_ids=duplicates
    )
