"""Ray Datasink that commits each write task's rows as atomic Parquet part files and gathers stats."""

from __future__ import annotations

from ray.data.block import BlockAccessor
from ray.data.datasource import Datasink

from pipelines.io import WriteStats, write_in_parts
from pipelines.storage import use
from schemas.job import StorageConfig


class CommittingParquetSink(Datasink):
    """Commits a part file every ``commit_every_rows`` rows a write task receives (at most
    ``rows_per_file``), so a kill loses little of a task's work; ``into`` commits under that subdirectory
    of the output (an overwrite's staging directory); ``lock_run_id`` makes each commit check that the run
    still holds the output's lock (``pipelines.lock``)."""

    def __init__(
        self,
        uri: str,
        run_id: str,
        rows_per_file: int,
        commit_every_rows: int | None = None,
        into: str | None = None,
        lock_run_id: str | None = None,
        storage: StorageConfig | None = None,
    ):
        self.uri, self.run_id = uri, run_id
        self.part_rows = min(rows_per_file, commit_every_rows or rows_per_file)
        self.into, self.lock_run_id = into, lock_run_id
        self.storage = storage  # the job's s3:// settings, for the write tasks' processes
        self.stats = WriteStats()  # filled on the driver by on_write_complete

    def write(self, blocks, ctx) -> WriteStats:
        use(self.storage)
        return write_in_parts(
            (BlockAccessor.for_block(b).to_arrow() for b in blocks),
            self.uri, self.run_id, ctx.task_idx, self.part_rows,
            into=self.into, lock_run_id=self.lock_run_id,
        )  # fmt: skip

    def on_write_complete(self, write_result) -> None:
        for stats in write_result.write_returns:
            self.stats.add(stats)
