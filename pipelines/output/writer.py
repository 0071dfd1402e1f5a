"""The output's writer: rows from the pipeline committed as part files sized by the config.

    stats = write_stream([ds], config.output, run_id, into=..., storage=config.storage)

The rows of the last stage wait in the buffer of one writer actor until a part is due: when
``output.commit_every_rows`` rows wait (a part never holds more, nor more than ``rows_per_file``), when
the oldest of them has waited ``output.commit_every_s`` seconds, and, for whatever remains, at the end of
the stream. So parts hold about ``commit_every_rows`` rows whatever size the pipeline's blocks are, and a
kill loses at most the rows waiting in the buffer.

The driver drives the stream (``Dataset.iter_internal_ref_bundles``: references to the blocks, never
their rows) and hands each block to the writer by reference; when the stream has ended it asks the writer
to commit what remains and to return its stats. Every commit is one atomic part (``write_part_files``:
temporary file and rename on a local disk, an upload under its final name on an object store) after a
check that the run still holds the output's lock. Part names number on per writer, so they are unique in
the run; nothing is retried, so nothing is written twice: a writer that dies ends the run (its waiting
rows are lost, the committed parts stay for ``resume``).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Iterable

import pyarrow as pa

from pipelines.output.layout import WRITERS
from pipelines.output.parts import WriteStats, write_part_files
from pipelines.spec import on_driver_node
from schemas.job import OutputConfig, StorageConfig
from schemas.output import OutputShape
from schemas.storage import use

MAX_BLOCKS_IN_FLIGHT = 4  # blocks handed to the writer and not yet taken in: the driver waits beyond this


def part_policy(output: OutputConfig) -> tuple[int, float]:
    """Rows in a part (``commit_every_rows``, at most ``rows_per_file``) and the longest a row waits for
    its part (``commit_every_s``)."""
    return min(output.rows_per_file, output.commit_every_rows), output.commit_every_s


class PartBuffer:
    """When parts are due (the policy alone: no files, no clock). ``add`` returns the parts that reached
    ``part_rows`` rows; ``due`` the waiting rows once the oldest has waited ``max_wait_s``; ``drain`` the
    rest. Times are the caller's clock readings."""

    def __init__(self, part_rows: int, max_wait_s: float):
        self.part_rows, self.max_wait_s = part_rows, max_wait_s
        self._waiting: deque[tuple[pa.Table, float]] = deque()  # (rows, when they came), oldest first
        self.rows = 0

    @property
    def oldest(self) -> float | None:
        return self._waiting[0][1] if self._waiting else None

    def add(self, table: pa.Table, now: float) -> list[pa.Table]:
        if table.num_rows:
            self._waiting.append((table, now))
            self.rows += table.num_rows
        parts = []
        while self.rows >= self.part_rows:
            parts.append(self._take(self.part_rows))
        return parts

    def due(self, now: float) -> pa.Table | None:
        oldest = self.oldest
        return self.drain() if oldest is not None and now - oldest >= self.max_wait_s else None

    def drain(self) -> pa.Table | None:
        return self._take(self.rows) if self.rows else None

    def _take(self, n: int) -> pa.Table:
        """The oldest ``n`` waiting rows; a table cut in two leaves its rest waiting since it came."""
        taken = []
        while n:
            table, came = self._waiting.popleft()
            if table.num_rows > n:
                self._waiting.appendleft((table.slice(n), came))
                table = table.slice(0, n)
            taken.append(table)
            n -= table.num_rows
            self.rows -= table.num_rows
        return pa.concat_tables(taken) if len(taken) > 1 else taken[0]


class PartWriter:
    """Commits the rows it is given as parts when ``PartBuffer`` says they are due; ``tick`` commits by
    age between blocks, ``close`` commits the rest and returns what was committed. Thread-safe (the actor
    ticks from a thread of its own); callable without Ray."""

    def __init__(
        self,
        uri: str,
        run_id: str,
        index: int,
        part_rows: int,
        max_wait_s: float = float("inf"),
        *,
        into: str | None = None,
        lock_run_id: str | None = None,
        storage: StorageConfig | None = None,
        shape: OutputShape | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.uri, self.run_id, self.index = uri, run_id, index
        self.into, self.lock_run_id, self.storage, self.shape = into, lock_run_id, storage, shape
        self.buffer = PartBuffer(part_rows, max_wait_s)
        self.clock = clock
        self.stats = WriteStats()
        self._lock = threading.Lock()

    def add(self, table: pa.Table) -> int:
        """Take a block's rows; commit the parts now due. Returns the rows committed so far."""
        with self._lock:
            now = self.clock()
            for part in self.buffer.add(table, now):
                self._commit(part)
            if (part := self.buffer.due(now)) is not None:
                self._commit(part)
            return self.stats.rows

    def tick(self) -> None:
        with self._lock:
            if (part := self.buffer.due(self.clock())) is not None:
                self._commit(part)

    def close(self) -> WriteStats:
        with self._lock:
            if (part := self.buffer.drain()) is not None:
                self._commit(part)
            return self.stats

    def _commit(self, part: pa.Table) -> None:
        if self.storage is not None:  # the job's settings, in the actor's process (None: this process's)
            use(self.storage)
        self.stats.add(
            write_part_files(
                part, self.uri, self.run_id, self.index, part.num_rows,
                first_chunk=len(self.stats.files), into=self.into, lock_run_id=self.lock_run_id,
                shape=self.shape,
            )
        )  # fmt: skip


def write_in_parts(
    tables: Iterable[pa.Table],
    uri: str,
    run_id: str,
    index: int,
    part_rows: int,
    *,
    into: str | None = None,
    lock_run_id: str | None = None,
) -> WriteStats:
    """Tables committed as part files of ``part_rows`` rows as soon as that many have come, the rest at
    the end, in this process (``PartWriter``, with no time limit: nothing ticks here)."""
    writer = PartWriter(uri, run_id, index, part_rows, into=into, lock_run_id=lock_run_id)
    for table in tables:
        writer.add(table)
    return writer.close()


class WriterActor(PartWriter):
    """``PartWriter`` as a Ray actor: a thread of its own commits rows that have waited long enough while
    no block comes. A failed commit there is raised by the next ``add`` or ``close``."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._failed: BaseException | None = None
        self._stop = threading.Event()
        poll_s = min(1.0, self.buffer.max_wait_s / 4)
        threading.Thread(target=self._ticks, args=(poll_s,), name="part-timer", daemon=True).start()

    def _ticks(self, poll_s: float) -> None:
        while not self._stop.wait(poll_s):
            try:
                self.tick()
            except BaseException as e:  # kept for the driver: the next call raises it
                self._failed = e
                return

    def add(self, block) -> int:
        self._raise_if_failed()
        if not isinstance(block, pa.Table):  # the stages' blocks are Arrow; any other kind is converted
            from ray.data.block import BlockAccessor

            block = BlockAccessor.for_block(block).to_arrow()
        return super().add(block)

    def close(self) -> WriteStats:
        self._stop.set()
        self._raise_if_failed()
        return super().close()

    def _raise_if_failed(self) -> None:
        if self._failed is not None:
            raise self._failed


def write_stream(
    datasets: Iterable,
    output: OutputConfig,
    run_id: str,
    *,
    into: str | None = None,
    lock_run_id: str | None = None,
    storage: StorageConfig | None = None,
    shape: OutputShape | None = None,
) -> WriteStats:
    """Run each dataset to its end, one after another (the input's segments: each its own Ray Data
    execution), their rows committed by the same writer actors, so part names run on across them; returns
    what was committed. The driver holds block references and at most ``MAX_BLOCKS_IN_FLIGHT`` calls per
    writer, never rows."""
    import ray

    actor = ray.remote(WriterActor).options(
        num_cpus=0, max_restarts=0, max_task_retries=0, scheduling_strategy=on_driver_node()
    )
    writers = [
        actor.remote(output.path, run_id, i, *part_policy(output),
                     into=into, lock_run_id=lock_run_id, storage=storage, shape=shape)
        for i in range(WRITERS)
    ]  # fmt: skip
    try:
        in_flight: list = []
        refs = (ref for ds in datasets for ref in _block_refs(ds))  # the next execution starts after this one
        for n, ref in enumerate(refs):
            in_flight.append(writers[n % WRITERS].add.remote(ref))
            if len(in_flight) >= MAX_BLOCKS_IN_FLIGHT * WRITERS:
                done, in_flight = ray.wait(in_flight, num_returns=1)
                ray.get(done)  # a failed commit ends the run here
        ray.get(in_flight)
        stats = WriteStats()
        for part in ray.get([w.close.remote() for w in writers]):
            stats.add(part)
        return stats
    finally:
        for w in writers:
            ray.kill(w)


def _block_refs(ds) -> Iterable:
    for bundle in ds.iter_internal_ref_bundles():
        yield from bundle.block_refs
