"""When the output's parts are committed (pipelines/output/writer.py): once output.commit_every_rows rows wait,
once the oldest waiting row has waited output.commit_every_s seconds, and the rest at the end; parts stay
atomic, lock-checked and uniquely named. A stand-in clock: no sleeps."""

import threading
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pydantic import ValidationError

from pipelines.output.commit import committed_ids
from pipelines.output.layout import TMP_DIR, staging_name
from pipelines.output.lock import LockLost, OutputLock
from pipelines.output.writer import PartBuffer, PartWriter, WriterActor, part_policy
from pipelines.phi4mm import parts_summary
from schemas.job import OutputConfig
from schemas.rows import OUTPUT_SCHEMA


def _rows(ids):
    return pa.Table.from_pylist([{"id": i, "status": "ok"} for i in ids], schema=OUTPUT_SCHEMA)


def _block(start, n):
    return _rows([f"r{i:03d}" for i in range(start, start + n)])


class Clock:
    def __init__(self):
        self.now = 1000.0
        self._lock = threading.Lock()

    def __call__(self) -> float:
        with self._lock:
            return self.now

    def advance(self, seconds: float) -> None:
        with self._lock:
            self.now += seconds


def _sizes(out, stats):
    return [pq.read_metadata(out / name).num_rows for name in stats.files]


def test_parts_fill_to_part_rows_across_blocks():
    buffer = PartBuffer(part_rows=10, max_wait_s=60)
    parts = []
    for k in range(7):  # blocks of 3 rows: 21 rows
        parts += buffer.add(_block(3 * k, 3), now=float(k))
    assert [p.num_rows for p in parts] == [10, 10] and buffer.rows == 1
    assert pa.concat_tables(parts).column("id").to_pylist() == [f"r{i:03d}" for i in range(20)]  # in order
    # the row left over came in the last block (t=6): it waits since then, not since the first block
    assert buffer.oldest == 6.0
    assert buffer.drain().column("id").to_pylist() == ["r020"] and buffer.drain() is None


def test_a_block_bigger_than_a_part_gives_whole_parts_and_a_waiting_rest():
    buffer = PartBuffer(part_rows=4, max_wait_s=60)
    assert [p.num_rows for p in buffer.add(_block(0, 10), now=5.0)] == [4, 4]
    assert buffer.rows == 2 and buffer.oldest == 5.0


def test_rows_are_due_once_the_oldest_has_waited_max_wait_s():
    buffer = PartBuffer(part_rows=100, max_wait_s=30)
    assert buffer.due(now=0.0) is None  # nothing waits
    buffer.add(_block(0, 2), now=0.0)
    buffer.add(_block(2, 2), now=20.0)
    assert buffer.due(now=29.9) is None
    part = buffer.due(now=30.0)  # the first block's rows have waited 30 s: everything waiting goes
    assert part.num_rows == 4 and buffer.rows == 0 and buffer.oldest is None
    assert buffer.due(now=1000.0) is None


def test_empty_blocks_do_not_start_the_clock():
    buffer = PartBuffer(part_rows=4, max_wait_s=10)
    buffer.add(_block(0, 0), now=0.0)
    assert buffer.oldest is None and buffer.due(now=100.0) is None


def test_writer_commits_parts_of_commit_every_rows_then_the_rest(tmp_path):
    clock = Clock()
    writer = PartWriter(str(tmp_path), "run1", 0, 8, 60.0, clock=clock)
    for k in range(10):  # 30 rows in blocks of 3, one block a second: none waits 60 s
        writer.add(_block(3 * k, 3))
        clock.advance(1)
    assert writer.stats.rows == 24 and len(writer.stats.files) == 3  # 3 parts of 8, 6 rows waiting
    stats = writer.close()
    assert _sizes(tmp_path, stats) == [8, 8, 8, 6] and stats.rows == 30
    assert stats.files == [f"part-run1-000000-{i:04d}.parquet" for i in range(4)]
    assert sorted(committed_ids(str(tmp_path)).to_pylist()) == [f"r{i:03d}" for i in range(30)]
    assert list((tmp_path / TMP_DIR).iterdir()) == []


def test_writer_commits_by_age_when_rows_come_slowly(tmp_path):
    clock = Clock()
    writer = PartWriter(str(tmp_path), "run1", 2, 1000, 60.0, clock=clock)
    writer.add(_block(0, 3))
    clock.advance(59)
    writer.tick()
    assert writer.stats.files == []  # 59 s: not yet
    writer.add(_block(3, 3))  # a block that comes when the first rows are due commits them all
    clock.advance(1)
    writer.tick()
    assert _sizes(tmp_path, writer.stats) == [6]
    writer.add(_block(6, 2))
    clock.advance(60)
    writer.tick()  # between blocks: the timer's tick commits them
    stats = writer.close()  # nothing left
    assert _sizes(tmp_path, stats) == [6, 2] and stats.files[-1] == "part-run1-000002-0001.parquet"


def test_writer_checks_the_lock_before_each_commit(tmp_path):
    out = str(tmp_path)
    writer = PartWriter(out, "mine", 0, 2, lock_run_id="mine")
    with OutputLock(out, "mine"):
        writer.add(_block(0, 2))
    with OutputLock(out, "other"), pytest.raises(LockLost):
        writer.add(_block(2, 2))
    assert sorted(committed_ids(out).to_pylist()) == ["r000", "r001"]  # nothing more committed


def test_writer_commits_into_an_overwrite_staging_directory(tmp_path):
    writer = PartWriter(str(tmp_path), "run1", 0, 4, into=staging_name("run1"))
    writer.add(_block(0, 5))
    stats = writer.close()
    assert committed_ids(str(tmp_path)).to_pylist() == []  # the output itself is untouched
    assert sorted(p.name for p in (tmp_path / staging_name("run1")).iterdir()) == sorted(stats.files)


def _wait_for(condition, timeout_s=30):
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_writer_actor_commits_waiting_rows_on_its_own_timer(tmp_path):
    clock = Clock()
    actor = WriterActor(str(tmp_path), "run1", 0, 1000, 5.0, clock=clock)  # as Ray runs it, minus Ray
    actor.add(_block(0, 3))
    clock.advance(5)
    _wait_for(lambda: actor.stats.rows == 3)  # no block came: the timer thread committed them
    assert actor.close().files == ["part-run1-000000-0000.parquet"]


def test_a_failed_timed_commit_is_raised_by_the_next_call(tmp_path):
    clock = Clock()
    out = str(tmp_path)
    actor = WriterActor(out, "mine", 0, 1000, 5.0, lock_run_id="mine", clock=clock)
    with OutputLock(out, "other"):
        actor.add(_block(0, 3))
        clock.advance(5)
        _wait_for(lambda: actor._failed is not None)
    with pytest.raises(LockLost):
        actor.add(_block(3, 1))
    assert committed_ids(out).to_pylist() == []


def test_part_policy_and_its_bounds():
    assert part_policy(OutputConfig(path="o")) == (1000, 60.0)
    assert part_policy(OutputConfig(path="o", rows_per_file=50, commit_every_rows=200, commit_every_s=5)) == (
        50,
        5.0,
    )
    for bad in ({"commit_every_s": 0.5}, {"commit_every_s": 10**6}, {"commit_every_rows": 0}):
        with pytest.raises(ValidationError):
            OutputConfig(path="o", **bad)


def test_the_summary_names_a_few_parts_and_counts_them_all():
    names = [f"part-r-000000-{i:04d}.parquet" for i in range(100)]
    assert parts_summary(names[:2]) == {"count": 2, "first": names[:2], "last": []}
    assert parts_summary(names[::-1]) == {"count": 100, "first": names[:3], "last": names[-3:]}
