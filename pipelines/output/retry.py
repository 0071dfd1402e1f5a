"""Error rows run again into the same output, one row per id kept (``output.retry_errors``, CLI
``--retry-errors CODE,...``; docs/reliability.md, "Running error rows again").

Resume skips every id the output holds, error rows included. A retry runs again the rows whose error code
is one of the chosen codes, with the rows not done yet as resume does, and replaces each old row by its
new one (ok, or an error again) in one commit:

    retry = retry_of(config.output, done_ids, run_ids)          # which rows, in which parts
    skip = without(done_ids, retry.ids)                          # they are run again
    ... the run stages its parts under _staging-<run>/, as an overwrite does ...
    staged = stats.files + stage_kept_rows(out.path, run_id, retry)
    audit_ids(input_ids, IdColumn of parts_after(out.path, run_id, retry, staged), run_ids)
    commit_retry(out.path, run_id, staged, retry)               # one marker, then the swap

A part mixes rows to keep with rows to replace, so rows are replaced, not parts: each part holding a row
to replace is rewritten (staged) without it, and the run's commit marker names its new parts (new results
and rewritten parts) and the old parts they replace (``replaces``, as an overwrite's marker does). The
marker is one write; then the swap moves the new parts in and deletes the old ones, and a swap cut short
is finished by the next run (``pipelines.output.interrupted.finish_interrupted_swaps``). Before the
marker the output is unchanged: a retry killed or failing its audit leaves every old row in place, and
the next run removes its staged parts. Resume and the audit follow the markers (``committed_parts``), so
they see the old rows or the new ones; a plain reader listing ``part-*.parquet`` during the swap may see
both for its duration (a retried id twice), never neither.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipelines.output.audit import IdsLike
from pipelines.output.commit import committed_parts, swap, write_marker
from pipelines.output.ids import IdColumn, array_batches, id_strings
from pipelines.output.layout import name_of, part_name, staging_name, write_atomically
from schemas.job import OutputConfig
from schemas.storage import filesystem_for

RETRY_MODE = "retry"  # the commit marker's mode (pipelines.output.commit.SWAPPING_MODES)
# part_name's writer index for rewritten parts: past any writer's (pipelines.output.writer)
KEPT_WRITER = 999_999


@dataclass(frozen=True)
class RetryPlan:
    """The rows a retry runs again: per part of the output, the ids of its rows to replace."""

    codes: tuple[str, ...]
    parts: dict[str, pa.Array]  # part name -> ids (string form) of its rows run again

    @property
    def ids(self) -> pa.Array:
        return pa.concat_arrays([pa.array([], pa.string()), *self.parts.values()])

    @property
    def rows(self) -> int:
        return sum(len(ids) for ids in self.parts.values())


def plan_retry(uri: str, codes: Iterable[str], code_column: str, run_ids: IdsLike) -> RetryPlan:
    """The output's rows whose ``code_column`` (``error_code``, as ``output.column_names`` names it) is
    one of ``codes`` and whose id the run answers for (``run_ids``: every input id, or a --limit run's):
    a row of an id not in the run is not run again, so it stays. Reads two columns of each part."""
    codes = tuple(codes)
    fs, _ = filesystem_for(uri)
    found: dict[str, pa.Array] = {}
    for path in committed_parts(uri):
        if code_column not in pq.read_schema(path, filesystem=fs).names:
            continue
        table = pq.read_table(path, filesystem=fs, columns=["id", code_column])
        hit = pc.fill_null(pc.is_in(table.column(code_column), value_set=pa.array(codes, pa.string())), False)
        if pc.any(hit).as_py():
            found[name_of(path)] = id_strings(table.column("id").filter(hit))
    if not found:
        return RetryPlan(codes, {})
    candidates = pa.concat_arrays(list(found.values()))
    batches = run_ids.batches() if isinstance(run_ids, IdColumn) else array_batches(run_ids)
    ran = [ids.filter(pc.fill_null(pc.is_in(ids, value_set=candidates), False)) for _, _, ids in batches]
    ran = pa.concat_arrays([pa.array([], pa.string()), *ran])
    parts = {name: ids.filter(pc.is_in(ids, value_set=ran)) for name, ids in found.items()}
    return RetryPlan(codes, {name: ids for name, ids in parts.items() if len(ids)})


def retry_of(output: OutputConfig, done_ids: pa.Array, run_ids: IdsLike) -> RetryPlan | None:
    """The rows ``output.retry_errors`` runs again among the output's ``done_ids``; None when there are
    none (the run is a plain resume)."""
    if not output.retry_errors or not len(done_ids):
        return None
    code_column = output.column_names.get("error_code", "error_code")
    retry = plan_retry(output.path, output.retry_errors, code_column, run_ids)
    return retry if retry.rows else None


def without(ids: pa.Array, drop: pa.Array) -> pa.Array:
    """``ids`` less those in ``drop`` (resume's skip set less the rows a retry runs again)."""
    return ids.filter(pc.invert(pc.fill_null(pc.is_in(ids, value_set=drop), False))) if len(drop) else ids


def stage_kept_rows(uri: str, run_id: str, retry: RetryPlan) -> list[str]:
    """Each part holding a row to replace, rewritten without those rows under the run's staging directory
    (its schema and metadata as they were, so the output's columns and datasets features stay); returns
    the new parts' names. A part all of whose rows are replaced gets none."""
    fs, root = filesystem_for(uri)
    staging = f"{root}/{staging_name(run_id)}"
    names: list[str] = []
    for old, ids in sorted(retry.parts.items()):
        table = pq.read_table(f"{root}/{old}", filesystem=fs)
        kept = table.filter(pc.invert(pc.is_in(id_strings(table.column("id")), value_set=ids)))
        if not kept.num_rows:
            continue
        name = part_name(run_id, KEPT_WRITER, len(names))
        buffer = pa.BufferOutputStream()
        pq.write_table(kept, buffer, compression="zstd")
        write_atomically(fs, staging, name, buffer.getvalue())  # whole, as every part
        names.append(name)
    return names


def parts_after(uri: str, run_id: str, retry: RetryPlan, staged: Iterable[str]) -> IdColumn:
    """The ``id`` column of the output as ``commit_retry`` will leave it: its parts less those replaced,
    plus the run's staged ones. What the retry's audit checks before anything is committed."""
    fs, root = filesystem_for(uri)
    kept = [p for p in committed_parts(uri) if name_of(p) not in retry.parts]
    return IdColumn.of_files(
        fs, kept + [f"{root}/{staging_name(run_id)}/{n}" for n in sorted(staged)], "id", uri
    )


def commit_retry(uri: str, run_id: str, staged: Iterable[str], retry: RetryPlan) -> dict:
    """Commit a retry: its marker ``_committed-<run_id>.json`` names the staged parts and the old parts
    they replace (one write, then the commit index), then the swap moves the new parts in and deletes the
    old ones; a swap cut short is finished by the next run. Returns the marker."""
    fs, root = filesystem_for(uri)
    marker = {
        "run_id": run_id,
        "mode": RETRY_MODE,
        "parts": sorted(staged),
        "replaces": sorted(retry.parts),
        "retried": {"codes": list(retry.codes), "rows": retry.rows},
        "committed_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    write_marker(fs, root, marker)
    swap(fs, root, marker)
    return marker
