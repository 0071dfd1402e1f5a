"""The CPU stage on this machine's cores, without Ray: ``--dry-run`` and the GPU benchmark's engine side
(rows prepared beforehand) run ``actors.preprocess.PreprocessRows`` over many batches this way.

    for table in prepare_in_processes(config, batches, workers, columns=[...]):
        ...

Each worker process builds its own stage once (it loads the tokenizer); batches go out at most two per
worker at a time, so memory stays bounded whatever the input's size, and come back in the order given
(``in_order``, which ``bench.dataset`` uses too).
"""

from __future__ import annotations

import multiprocessing
import os
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor

import pyarrow as pa

from schemas.job import JobConfig

_STAGE = None  # this process's CPU stage
_COLUMNS: list[str] | None = None


def _start(config: JobConfig, columns: list[str] | None) -> None:
    global _STAGE, _COLUMNS
    from actors.preprocess import PreprocessRows

    _STAGE, _COLUMNS = PreprocessRows(config), columns


def _prepare(table: pa.Table) -> pa.Table:
    out = _STAGE(table)
    return out.select(_COLUMNS) if _COLUMNS else out  # selected in the worker: less to send back


def usable_cores() -> int:
    """The cores this process may use (its CPU affinity), not the host's."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def in_order(fn, items: Iterable, workers: int, initializer=None, initargs: tuple = ()) -> Iterator:
    """``fn`` over ``items``, results in the items' order, on ``workers`` spawned processes (in this
    process for one; ``initializer(*initargs)`` first in each), at most two items per worker in flight so
    memory stays bounded. ``fn`` and ``initializer`` must be module-level (they are pickled)."""
    if workers <= 1:
        if initializer:
            initializer(*initargs)
        yield from map(fn, items)
        return
    # spawn, not fork: the parent may hold a tokenizer's or pyarrow's threads, whose locks fork would copy
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(workers, context, initializer=initializer, initargs=initargs) as pool:
        pending = deque()
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= 2 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def prepare_in_processes(
    config: JobConfig, batches: Iterable[pa.Table], workers: int, columns: list[str] | None = None
) -> Iterator[pa.Table]:
    """Each batch through the CPU stage, in order, on ``workers`` processes (in this process for one);
    ``columns``: only those of each prepared batch."""
    return in_order(_prepare, batches, workers, _start, (config, columns))
