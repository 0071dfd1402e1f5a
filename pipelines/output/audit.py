"""The audit: every id a run answers for has exactly one output row, checked in bounded memory
(``pipelines.output.ids``: hash buckets of at most about a million ids)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc

from pipelines.output.commit import committed_parts
from pipelines.output.ids import IdColumn, array_batches, partition
from schemas.storage import filesystem_for


@dataclass
class Audit:
    input_rows: int
    output_rows: int
    missing_ids: int
    duplicate_ids: int
    unexpected_ids: int = 0  # output rows whose id is not in the input at all

    def plus(self, other: Audit) -> Audit:
        """The audit of two disjoint sets of ids (two buckets): every count adds up."""
        return Audit(**{k: getattr(self, k) + getattr(other, k) for k in self.__dataclass_fields__})

    @property
    def ok(self) -> bool:
        return (
            self.output_rows == self.input_rows
            and not self.missing_ids
            and not self.duplicate_ids
            and not self.unexpected_ids
        )


_NULL_KEY = "\x00null"  # joins never match nulls: they get a key no real id can have
_INPUT, _RUN, _OUTPUT = 0, 1, 2  # which stream a bucket row comes from
_AUDIT_SCHEMA = pa.schema([("id", pa.string()), ("src", pa.int8())])

IdsLike = pa.Array | pa.ChunkedArray | IdColumn  # ids in memory, or a column streamed from Parquet files


def output_ids(uri: str, known_parts: Iterable[str] = ()) -> IdColumn:
    """The ``id`` column of the output's part files, to stream (``committed_ids`` reads it whole).
    ``known_parts``: names of parts the caller knows it committed there, included even while a lagging
    listing does not show them."""
    fs, root = filesystem_for(uri)
    parts = set(committed_parts(uri)) | {f"{root}/{name}" for name in known_parts}
    return IdColumn.of_files(fs, sorted(parts), "id", uri)


def audit(
    input_ids: IdsLike, output_uri: str, run_ids: IdsLike | None = None, known_parts: Iterable[str] = ()
) -> Audit:
    """Compare the ids a run answers for, ``run_ids`` (default: every input id), with every committed
    output row: each appears in the output as often as in the input, so exactly once for unique ids.

    ``input_rows`` / ``output_rows`` count the run's ids and the output rows that carry one of them:
    output rows for other input ids (a ``--limit`` run resuming into a fuller output) are not this run's.
    Output rows whose id is not in the input at all are ``unexpected_ids`` and fail the audit.

    Every count is per id, so the ids (input, run, output) are hash-partitioned together
    (``pipelines.output.ids.partition``) and each bucket is counted on its own: the driver holds one bucket of
    ids, not all of them. ``known_parts``: the run's own parts (``output_ids``)."""
    return audit_ids(input_ids, output_ids(output_uri, known_parts), run_ids)


def audit_ids(input_ids: IdsLike, outputs: IdColumn, run_ids: IdsLike | None = None) -> Audit:
    """``audit`` against the ``id`` column of given part files (``outputs``): a retry audits the output
    as its commit will leave it, before committing (``pipelines.output.retry.parts_after``)."""
    streams = [(_INPUT, input_ids), (_OUTPUT, outputs)] + ([(_RUN, run_ids)] if run_ids is not None else [])
    rows = sum(_rows(ids) for _, ids in streams)
    total = Audit(0, 0, 0, 0, 0)
    with partition(_tagged(streams), rows, _AUDIT_SCHEMA) as buckets:
        for bucket in buckets:
            total = total.plus(_audit_bucket(bucket, separate_run=run_ids is not None))
    return total


def _rows(ids: IdsLike) -> int:
    return ids.rows if isinstance(ids, IdColumn) else len(ids)


def _tagged(streams: list[tuple[int, IdsLike]]) -> Iterable[pa.Table]:
    for src, ids in streams:
        batches = ids.batches() if isinstance(ids, IdColumn) else array_batches(ids)
        for _, _, batch in batches:
            yield pa.table(
                {
                    "id": pc.fill_null(batch, _NULL_KEY),
                    "src": pa.repeat(pa.scalar(src, pa.int8()), len(batch)),
                }
            )


def _audit_bucket(bucket: pa.Table, separate_run: bool) -> Audit:
    """The audit of the ids of one bucket (all occurrences of each of its ids, from every stream)."""

    def of(src: int) -> pa.Array:
        return bucket.filter(pc.equal(bucket.column("src"), src)).column("id").combine_chunks()

    inputs = of(_INPUT)
    expected = of(_RUN) if separate_run else inputs
    out_ids = of(_OUTPUT)
    unexpected = int(pc.sum(pc.invert(pc.is_in(out_ids, value_set=inputs))).as_py() or 0)
    out_ids = out_ids.filter(pc.is_in(out_ids, value_set=expected))
    in_counts = pa.table({"id": expected}).group_by("id").aggregate([([], "count_all")])
    out_counts = pa.table({"id": out_ids}).group_by("id").aggregate([([], "count_all")])
    joined = in_counts.join(out_counts, "id", join_type="full outer", left_suffix="_in", right_suffix="_out")
    n_in = pc.fill_null(joined.column("count_all_in"), 0)
    n_out = pc.fill_null(joined.column("count_all_out"), 0)
    diff = pc.subtract(n_out, n_in)
    return Audit(
        input_rows=len(expected),
        output_rows=len(out_ids),
        missing_ids=int(pc.sum(pc.if_else(pc.less(diff, 0), pc.negate(diff), 0)).as_py() or 0),
        duplicate_ids=int(pc.sum(pc.if_else(pc.greater(diff, 0), diff, 0)).as_py() or 0),
        unexpected_ids=unexpected,
    )
