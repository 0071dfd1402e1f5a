"""Runs over an input directory that keeps receiving Parquet files (docs/running.md, "Scheduled and incremental
runs"): with ``output.mode: resume``, a run reads only the files that hold a row not yet in the output,
and its manifest lists every input file it saw.

    files = pending_files(plan.input_ids, done_ids)   # what Ray reads
    manifest["input_files"] = input_files_record(plan.input_ids, files)
    for group in file_segments(plan.input_ids, files, segment_rows): ...   # one Ray Data execution each

Whether a file is done is decided by its ids alone (its id column against the output's), not by names,
sizes or times: a file a killed run half processed, or one rewritten in place with new rows, is read
again, and resume skips its rows that are done.
"""

from __future__ import annotations

from dataclasses import replace

import pyarrow as pa
import pyarrow.compute as pc

from pipelines.output.ids import IdColumn, footer_rows, shown


def pending_files(input_ids: IdColumn, done_ids: pa.Array) -> list[str]:
    """The input files with at least one id not in ``done_ids``, in input order (every file when nothing
    is done). Reads the id column of each file at most, and stops reading a file at its first such id."""
    if not len(done_ids):
        return list(input_ids.files)
    pending = []
    for path in input_ids.files:
        for _, _, ids in replace(input_ids, files=(path,)).batches():
            if not pc.all(pc.is_in(ids, value_set=done_ids)).as_py():
                pending.append(path)
                break
    return pending


def input_files_record(input_ids: IdColumn, read: list[str]) -> dict:
    """The manifest's ``input_files``: every file the run saw (as the user named the input), its rows,
    and whether the run read it (a file whose rows were all in the output already was not read)."""
    chosen = set(read)
    rows = footer_rows(input_ids.fs, input_ids.files)
    files = [
        {"path": shown(input_ids.uri, path), "rows": n, "read": path in chosen}
        for path, n in zip(input_ids.files, rows, strict=True)
    ]
    return {"count": len(files), "read": len(chosen), "rows": sum(rows), "files": files}


def file_segments(input_ids: IdColumn, files: list[str], segment_rows: int) -> list[list[str]]:
    """``files`` in input order, cut into runs of whole files of at least ``segment_rows`` rows each (the
    last may hold fewer; rows from the Parquet footers, done rows included): each is run as a Ray Data
    execution of its own, so that the driver's per-execution bookkeeping stays bounded (docs/reliability.md, "Memory
    under load"). Always at least one segment, empty when ``files`` is."""
    if input_ids.rows <= segment_rows:  # one segment: no footers read again
        return [list(files)]
    counts = dict(zip(input_ids.files, footer_rows(input_ids.fs, input_ids.files), strict=True))
    segments: list[list[str]] = [[]]
    rows = 0
    for path in files:
        if rows >= segment_rows:
            segments.append([])
            rows = 0
        segments[-1].append(path)
        rows += counts.get(path, 0)
    return segments


def done_among(input_ids: IdColumn, files: list[str], done_ids: pa.Array) -> pa.Array:
    """The ids of ``files`` that ``done_ids`` holds: the skip set one segment's read tasks need. Every read
    task gets its skip set with its arguments, so a segment's is at most its own rows, not the output's
    every id (a resumed run of millions of rows would send them all to every task)."""
    found = [
        ids.filter(pc.fill_null(pc.is_in(ids, value_set=done_ids), False))
        for _, _, ids in replace(input_ids, files=tuple(files)).batches()
    ] if len(done_ids) and files else []  # fmt: skip
    return pa.concat_arrays(found) if found else pa.array([], pa.string())
