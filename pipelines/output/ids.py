"""Row ids in bounded memory: stream an id column, hash-partition it, work one bucket at a time.

Validation (null, empty and repeated ids) and the audit (missing, duplicated and unexpected ids) are
questions about *all* ids at once, but every one of them is answered per id: an id is repeated, missing
or unexpected whatever the other ids are. So the ids are split by a hash of their string form into K
buckets such that every occurrence of one id, whichever stream it comes from (input, a --limit run's ids,
output), lands in the same bucket; each bucket is then answered on its own and the answers are summed.

Memory bound: the driver holds at most ``BUCKET_IDS`` ids at once, never the whole column: while
spilling, one read batch plus the rows waiting to be written (flushed at half a bucket); afterwards one
bucket (K is chosen from the row count, read from Parquet footers without reading data, so that buckets
are half full on average and hash skew does not overfill them). Holding 20 M ids took 2.6 GB; now it is
~1 M ids (some 50-100 MB) whatever the row count, plus K open temporary files and, on disk, the ids once
more (Arrow IPC files in the temporary directory, ``TMPDIR``).

Inputs up to ``BUCKET_IDS`` rows (one bucket) stay in memory: no temporary files, as fast as before.

    with partition(tables, rows, schema) as buckets:   # reads every table first
        for bucket in buckets:                         # then loads one bucket at a time
            ...

Derived ids (``input.derived_ids``, for inputs without an id column such as ``Dataset.to_parquet()``'s):
a row's id is its file's path relative to ``input.path``, ``:`` and its row in that file, counted from 0
(``train-00000-of-00001.parquet:41``). They are made from the files' footers (no data read), are unique
and never blank by construction, and are the same in every run while the files stay as they are:
rewriting or reordering a file changes its rows' ids, and resume and the audit match rows by them.
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

BUCKET_IDS = 1_000_000  # the most ids one bucket (and so the driver) holds at once
BATCH_IDS = 65_536  # ids read per batch (at most half a bucket): the streaming step's own footprint
_HASH_BYTES = 4 << 20  # bytes of ids hashed at once: the hash needs 8 bytes of scratch per id byte

# Tests set this to see how many ids each step holds at once (a count, not a timing: robust).
observe: Callable[[int], None] | None = None


def _held(n: int) -> None:
    if observe is not None:
        observe(n)


def batch_ids() -> int:
    """Ids per read batch: at most half a bucket, so a batch plus the rows waiting to be spilled (flushed
    at half a bucket) never exceed BUCKET_IDS."""
    return max(1, min(BATCH_IDS, BUCKET_IDS // 2))


def shown(uri: str, path: str) -> str:
    """A file as the user knows it: with its URL scheme when the input is a URL."""
    return f"{uri.split('://', 1)[0]}://{path}" if "://" in uri else path


class IdReadError(Exception):
    """An id column that cannot be read (``kind="read"``) or whose values have no text form (``"text"``)."""

    def __init__(self, kind: str, path: str, id_type: pa.DataType | None, reason: str):
        super().__init__(f"{path}: {reason}")
        self.kind, self.path, self.id_type, self.reason = kind, path, id_type, reason


def id_strings(ids: pa.Array | pa.ChunkedArray) -> pa.Array:
    """Row ids in the one string form used on write, resume and the audit alike, whatever their Arrow type:
    Arrow's own cast, so a float id 1.0 is "1" in the output, in resume's skip set and in the audit (the
    CPU stage's ``str()`` would have made it "1.0"). Nulls stay null. Raises ``pa.ArrowInvalid`` for ids
    without a text form (binary that is not UTF-8), ``pa.ArrowNotImplementedError`` for nested types."""
    if isinstance(ids, pa.ChunkedArray):
        ids = ids.combine_chunks()
    if pa.types.is_dictionary(ids.type):
        ids = ids.dictionary_decode()
    return ids if ids.type == pa.string() else pc.cast(ids, pa.string())


@dataclass(frozen=True)
class IdColumn:
    """One column of ids in Parquet files, read batch by batch (that column only), never whole.

    ``rows`` comes from the files' footers; ``uri`` is how the user named the files (for messages).
    ``root``: the ids are derived, not read (see the module docstring): ``column`` is the column they go
    in, each file is named by its path relative to ``root`` (the input's path on ``fs``)."""

    fs: pafs.FileSystem
    files: tuple[str, ...]
    column: str
    uri: str
    rows: int
    root: str | None = None

    @classmethod
    def of_files(cls, fs: pafs.FileSystem, files: Iterable[str], column: str, uri: str) -> IdColumn:
        files = tuple(files)
        return cls(fs, files, column, uri, sum(footer_rows(fs, files)))

    def batches(self) -> Iterator[tuple[str, int, pa.Array]]:
        """``(file, first row in that file, ids in string form)`` in input order: files in the given
        order, rows in file order. Raises IdReadError naming the file."""
        for path in self.files:
            yield from self._derived_batches(path) if self.root is not None else self._file_batches(path)

    def tables(self, path: str, batch_size: int) -> Iterator[pa.Table]:
        """Every column of the file ``path``, in file order, ``batch_size`` rows at a time; with derived
        ids, their column appended (the same ids ``batches`` gives). What a read task or the dry run reads."""
        row = 0
        with pq.ParquetFile(path, filesystem=self.fs) as f:
            for batch in f.iter_batches(batch_size=batch_size):
                table = pa.Table.from_batches([batch])
                if self.root is not None:
                    table = table.append_column(
                        self.column, derived_ids(derived_name(self.root, path), row, table.num_rows)
                    )
                yield table
                row += table.num_rows

    def _derived_batches(self, path: str) -> Iterator[tuple[str, int, pa.Array]]:
        try:
            rows = pq.read_metadata(path, filesystem=self.fs).num_rows
        except (pa.ArrowInvalid, OSError) as e:
            raise IdReadError("read", path, None, _reason(e)) from None
        name, step = derived_name(self.root, path), batch_ids()
        for start in range(0, rows, step):
            ids = derived_ids(name, start, min(step, rows - start))
            _held(len(ids))
            yield path, start, ids

    def _file_batches(self, path: str) -> Iterator[tuple[str, int, pa.Array]]:
        row = 0
        try:
            with pq.ParquetFile(path, filesystem=self.fs) as f:
                for batch in f.iter_batches(batch_size=batch_ids(), columns=[self.column]):
                    raw = batch.column(0)
                    try:
                        ids = id_strings(raw)
                    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
                        raise IdReadError("text", path, raw.type, _reason(e)) from None
                    _held(len(ids))
                    yield path, row, ids
                    row += len(ids)
        except (pa.ArrowInvalid, OSError) as e:
            raise IdReadError("read", path, None, _reason(e)) from None


def derived_name(root: str, path: str) -> str:
    """How a derived id names the file ``path``: its path relative to the input's ``root`` (its base name
    when the input is that one file)."""
    root = root.rstrip("/")
    return path.rsplit("/", 1)[-1] if path == root else path[len(root) :].lstrip("/")


def derived_ids(name: str, start: int, n: int) -> pa.Array:
    """The derived ids of rows ``start`` .. ``start + n - 1`` of the file ``name``: ``name:row``."""
    rows = pc.cast(pa.arange(start, start + n), pa.string())
    return pc.binary_join_element_wise(f"{name}:", rows, "")


def _reason(e: BaseException) -> str:
    return str(e).splitlines()[0] if str(e) else type(e).__name__


def footer_rows(fs: pafs.FileSystem, files: tuple[str, ...]) -> list[int]:
    """Rows per Parquet file, from the footers only (no data read)."""
    if not files:
        return []

    def rows(path: str) -> int:
        return pq.read_metadata(path, filesystem=fs).num_rows

    # Footers are small reads; on object stores their latency dominates, so read several at once.
    with ThreadPoolExecutor(max_workers=min(16, len(files))) as pool:
        return list(pool.map(rows, files))


def array_batches(ids: pa.Array | pa.ChunkedArray) -> Iterator[tuple[str, int, pa.Array]]:
    """An id array already in memory (a --limit run's ids, tests), in the batches an IdColumn yields."""
    step = batch_ids()
    for start in range(0, len(ids), step):
        yield "", start, id_strings(ids[start : start + step])


# Tabulation hashing: the hash of a string is the sum (mod 2**64) of one random word per (position, byte).
# Vectorised over a whole batch with numpy (no Python call per id) and the same in every process.
_TABLE = np.random.default_rng(0x1D5).integers(
    0, np.iinfo(np.uint64).max, size=(256, 256), dtype=np.uint64, endpoint=True
)


def bucket_of(ids: pa.Array, k: int) -> np.ndarray:
    """The bucket (0..k-1) of each string id; equal strings always share one. Nulls count as ""."""
    if k == 1 or not len(ids):
        return np.zeros(len(ids), np.intp)
    if ids.null_count:
        ids = pc.fill_null(ids, "")
    ids = ids.combine_chunks() if isinstance(ids, pa.ChunkedArray) else ids
    _, offsets_buf, data_buf = ids.buffers()
    offsets = np.frombuffer(offsets_buf, np.int32)[ids.offset : ids.offset + len(ids) + 1].astype(np.int64)
    lo, hi = int(offsets[0]), int(offsets[-1])
    if hi - lo > _HASH_BYTES and len(ids) > 1:  # long ids: hash in halves to bound the scratch arrays
        half = len(ids) // 2
        return np.concatenate([bucket_of(ids[:half], k), bucket_of(ids[half:], k)])
    data = np.frombuffer(data_buf, np.uint8)[lo:hi] if data_buf is not None else np.zeros(0, np.uint8)
    starts, lengths = offsets[:-1] - lo, np.diff(offsets)
    position = np.arange(hi - lo) - np.repeat(starts, lengths)
    sums = np.zeros(hi - lo + 1, np.uint64)
    np.cumsum(_TABLE[position & 255, data], out=sums[1:])  # wraps mod 2**64, as a hash should
    hashes = sums[starts + lengths] - sums[starts]
    return (hashes % np.uint64(k)).astype(np.intp)


def bucket_count(rows: int) -> int:
    """1 up to BUCKET_IDS rows (kept in memory); above, buckets half full on average, so that hash skew
    (a few standard deviations, ~sqrt of a bucket's size) never takes one past BUCKET_IDS."""
    return 1 if rows <= BUCKET_IDS else math.ceil(2 * rows / BUCKET_IDS)


class Buckets:
    """Partitioned ids, loaded one bucket at a time (in memory when there is only one)."""

    def __init__(self, schema: pa.Schema, whole: pa.Table | None = None, paths: list[str] | None = None):
        self.schema, self._whole, self._paths = schema, whole, paths or []

    def __iter__(self) -> Iterator[pa.Table]:
        if self._whole is not None:
            yield self._whole
        for path in self._paths:
            with pa.ipc.open_stream(pa.memory_map(path)) as reader:
                table = reader.read_all()
            _held(table.num_rows)
            yield table
            del table  # one bucket at a time: let it go before the next is read


@contextmanager
def partition(tables: Iterable[pa.Table], rows: int, schema: pa.Schema) -> Iterator[Buckets]:
    """Read every table (each with a string ``id`` column) and split the rows by ``bucket_of(id)``.

    ``rows``: about how many rows there are (footers), to choose the number of buckets. Up to
    BUCKET_IDS the rows stay in memory; above, each bucket is a temporary file, deleted on exit."""
    k = bucket_count(rows)
    if k == 1:
        whole = pa.concat_tables([schema.empty_table(), *(t.cast(schema) for t in tables)])
        _held(whole.num_rows)
        yield Buckets(schema, whole=whole)
        return
    _allow_open_files(k)
    with tempfile.TemporaryDirectory(prefix="phi4mm-ids-") as tmp:
        yield Buckets(schema, paths=_spill(tables, k, schema, tmp))


def _spill(tables: Iterable[pa.Table], k: int, schema: pa.Schema, tmp: str) -> list[str]:
    """Append the tables' rows to their buckets' files; returns the files written.

    Rows wait in memory until half a bucket's worth has come, then go out together: one sort and one
    write per bucket for many read batches, so no bucket file gets a write per batch (K writes of a few
    rows each would dominate). Arrow IPC streams, not Parquet: nothing to encode, appending a batch is
    cheap and the writer keeps no per-write metadata in memory."""
    writers: dict[int, pa.ipc.RecordBatchStreamWriter] = {}
    pending: list[pa.Table] = []
    waiting = 0
    try:
        for table in tables:
            pending.append(table.cast(schema))
            waiting += table.num_rows
            _held(waiting)  # below BUCKET_IDS: flushed at half of it, batches are at most the other half
            if waiting >= BUCKET_IDS // 2:
                _flush(pending, k, schema, tmp, writers)
                pending, waiting = [], 0
        _flush(pending, k, schema, tmp, writers)
    finally:
        for writer in writers.values():
            writer.close()
    return [_bucket_path(tmp, b) for b in sorted(writers)]


def _bucket_path(tmp: str, b: int) -> str:
    return f"{tmp}/bucket-{b:06d}.arrows"


def _flush(
    pending: list[pa.Table],
    k: int,
    schema: pa.Schema,
    tmp: str,
    writers: dict[int, pa.ipc.RecordBatchStreamWriter],
) -> None:
    if not pending:
        return
    table = pa.concat_tables(pending)
    bucket = bucket_of(table.column("id").combine_chunks(), k)
    # Sorting by bucket turns k filters into one take and k slices; stable keeps the rows' order.
    table = table.take(pa.array(np.argsort(bucket, kind="stable"))).combine_chunks()
    start = 0
    for b, n in enumerate(np.bincount(bucket, minlength=k).tolist()):
        if n:
            if b not in writers:
                writers[b] = pa.ipc.new_stream(_bucket_path(tmp, b), schema)
            writers[b].write_table(table.slice(start, n))
            start += n


def _allow_open_files(k: int) -> None:
    """Every bucket file stays open while the ids are spilled: raise the soft limit on open files to make
    room (k is 2 per million ids: a default limit of 1024 would stop at about 500 M ids)."""
    try:
        import resource
    except ImportError:  # not on POSIX: leave the limit as it is
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = k + 256  # what the process holds besides
    if soft != resource.RLIM_INFINITY and soft < wanted:
        new = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))


def count_in(batches: Iterable[tuple[str, int, pa.Array]], value_set: pa.Array) -> int:
    """How many of the streamed ids are in ``value_set`` (e.g. resume's done ids), one batch at a time."""
    if not len(value_set):
        return 0
    return sum(int(pc.sum(pc.is_in(ids, value_set=value_set)).as_py() or 0) for _, _, ids in batches)
