"""Ray Datasink that commits each write task's rows as atomic Parquet part files and gathers stats."""

from __future__ import annotations

import pyarrow as pa
from ray.data.block import BlockAccessor
from ray.data.datasource import Datasink

from pipelines.io import WriteStats, write_part_files


class CommittingParquetSink(Datasink):
    def __init__(self, uri: str, run_id: str, rows_per_file: int):
        self.uri, self.run_id, self.rows_per_file = uri, run_id, rows_per_file
        self.stats = WriteStats()  # filled on the driver by on_write_complete

    def write(self, blocks, ctx) -> WriteStats:
        tables = [BlockAccessor.for_block(b).to_arrow() for b in blocks]
        tables = [t for t in tables if t.num_rows]
        if not tables:
            return WriteStats()
        return write_part_files(
            pa.concat_tables(tables), self.uri, self.run_id, ctx.task_idx, self.rows_per_file
        )

    def on_write_complete(self, write_result) -> None:
        for stats in write_result.write_returns:
            self.stats.add(stats)
