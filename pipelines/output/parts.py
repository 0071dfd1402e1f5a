"""Write: a table as part files, each appearing whole (``write_part_files``): on a local disk written
under ``_tmp/`` and renamed into place, on an object store uploaded under its final name; each after a
check that the run still holds the output's lock. ``WriteStats`` counts what was written."""

from __future__ import annotations

import uuid
from collections import Counter
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipelines.output.layout import TMP_DIR, exists, part_name, upload
from pipelines.output.lock import assert_lock_held
from schemas.multitask import TASK_PREFIX
from schemas.output import OutputShape
from schemas.storage import filesystem_for, is_object_store


@dataclass
class WriteStats:
    rows: int = 0
    files: list[str] = field(default_factory=list)
    status: Counter = field(default_factory=Counter)
    error_codes: Counter = field(default_factory=Counter)
    finish_reasons: Counter = field(default_factory=Counter)  # 'repetition': rows stopped as loops
    tasks: dict[str, Counter] = field(default_factory=dict)  # tasks: per task, 'ok' or an error code -> rows
    prompt_tokens: int = 0
    completion_tokens: int = 0

    def add(self, other: WriteStats) -> None:
        self.rows += other.rows
        self.files += other.files
        self.status.update(other.status)
        self.error_codes.update(other.error_codes)
        self.finish_reasons.update(other.finish_reasons)
        for name, counts in other.tasks.items():
            self.tasks.setdefault(name, Counter()).update(counts)
        self.prompt_tokens += other.prompt_tokens
        self.completion_tokens += other.completion_tokens

    @classmethod
    def of_table(cls, table: pa.Table) -> WriteStats:
        def counts(column: str) -> Counter:
            values = table.column(column).drop_null().to_pylist()
            return Counter(values)

        answers = {  # tasks: each task's answers (a row's own finish_reason is null then)
            n[len(TASK_PREFIX) :]: [t for t in table.column(n).to_pylist() if t is not None]
            for n in table.column_names
            if n.startswith(TASK_PREFIX)
        }
        finish_reasons = counts("finish_reason")
        for structs in answers.values():
            finish_reasons.update(t["finish_reason"] for t in structs if t["finish_reason"] is not None)
        return cls(
            rows=table.num_rows,
            status=counts("status"),
            error_codes=counts("error_code"),
            finish_reasons=finish_reasons,
            tasks={
                name: Counter(t["error_code"] or t["status"] for t in structs)
                for name, structs in answers.items()
            },
            prompt_tokens=int(pc.sum(table.column("prompt_tokens")).as_py() or 0),
            completion_tokens=int(pc.sum(table.column("completion_tokens")).as_py() or 0),
        )


def write_part_files(
    table: pa.Table,
    uri: str,
    run_id: str,
    task_idx: int,
    rows_per_file: int,
    *,
    first_chunk: int = 0,
    into: str | None = None,
    lock_run_id: str | None = None,
    shape: OutputShape | None = None,
) -> WriteStats:
    """Write a table as one or more part files, each made visible by an atomic move.

    ``into``: a subdirectory of the output to commit into (an overwrite's staging directory) instead of
    the output itself. ``lock_run_id``: check before each move that this run still holds the output's
    lock (``pipelines.output.lock.assert_lock_held``). Part names number on from ``first_chunk``. ``shape``: the
    job's output layout (renames; datasets metadata), applied after the counts are taken."""
    fs, root = filesystem_for(uri)
    dest = f"{root}/{into}" if into else root
    stats = WriteStats.of_table(table)
    table = (shape or OutputShape()).apply(table)  # OUTPUT_SCHEMA's columns cast, carried ones appended
    if is_object_store(fs):
        return _upload_part_files(fs, table, stats, dest, uri, run_id, task_idx, rows_per_file,
                                  first_chunk, lock_run_id)  # fmt: skip
    fs.create_dir(f"{root}/{TMP_DIR}", recursive=True)
    fs.create_dir(dest, recursive=True)
    for chunk_idx, offset in enumerate(range(0, table.num_rows, rows_per_file), start=first_chunk):
        name = part_name(run_id, task_idx, chunk_idx)
        tmp = f"{root}/{TMP_DIR}/{name}.{uuid.uuid4().hex}"
        try:
            with fs.open_output_stream(tmp) as sink:
                pq.write_table(table.slice(offset, rows_per_file), sink, compression="zstd")
            if lock_run_id is not None:
                assert_lock_held(uri, lock_run_id)
            fs.move(tmp, f"{dest}/{name}")
        except BaseException:
            if exists(fs, tmp):  # the next run would remove it too; no need to leave it until then
                fs.delete_file(tmp)
            raise
        stats.files.append(name)
    return stats


def _upload_part_files(
    fs, table, stats, dest, uri, run_id, task_idx, rows_per_file, first_chunk, lock_run_id
):
    """Object stores: each part is serialised in memory, then uploaded under its final name in one
    upload, which the store shows only once it is complete (no ``_tmp/``, no copy: there is no rename)."""
    for chunk_idx, offset in enumerate(range(0, table.num_rows, rows_per_file), start=first_chunk):
        name = part_name(run_id, task_idx, chunk_idx)
        buffer = pa.BufferOutputStream()
        pq.write_table(table.slice(offset, rows_per_file), buffer, compression="zstd")
        if lock_run_id is not None:
            assert_lock_held(uri, lock_run_id)
        upload(fs, f"{dest}/{name}", buffer.getvalue())
        stats.files.append(name)
    return stats
