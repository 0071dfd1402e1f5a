"""Parquet in and out, with the guarantees users rely on (docs/reliability.md, "Reliability"):

- the output is every ``part-*.parquet`` file directly in the output directory: what pyarrow, pandas and
  Ray read, and the one rule resume and the audit follow too. Everything else the project keeps there
  starts with ``_`` (``_lock``, ``_tmp/``, ``_staging-<run>/``, ``_committed-<run>.json``,
  ``_run-<run>.json``), which those readers skip;
- a part file appears whole: on a local disk it is written under ``_tmp/`` and renamed into place; on an
  object store, which has no rename but shows an upload only once it is complete, it is uploaded straight
  under its final, unique name (``pipelines.storage.is_object_store``);
- the commit markers ``_committed-<run>.json`` name every part each finished run wrote and every part an
  overwrite replaced. Resume and the audit trust them over a listing: a part a marker names is read by
  name even while a lagging listing does not show it yet, and a part an overwrite replaced is ignored
  even while a lagging listing still shows it (``committed_parts``). The markers are also kept together
  in ``_committed.json``, which is read by name: finding them needs no listing;
- ``resume`` and ``error`` runs commit parts as they go (``pipelines.output.writer``): a part once
  ``output.commit_every_rows`` rows wait for one or the oldest has waited ``output.commit_every_s``
  seconds, so a killed run keeps what it committed and ``resume`` carries on from there. The run that
  takes a killed run's lock over writes it the marker it never wrote (``record_interrupted_run``);
- an ``overwrite`` run commits its parts under ``_staging-<run>/``; only when the run is complete and
  audited does it write its commit marker ``_committed-<run>.json`` (new parts, parts they replace), move
  the new parts in and delete the old ones. A reader sees the old output until then, never none; a swap
  cut short is finished by the next run, which reads the marker;
- an overwrite deletes only parts a commit marker names: the runs of this output wrote them. A part file
  no marker names is never deleted, and an overwrite refuses to start while one is there
  (``check_output_mode``); a run that ends without its marker gets one when it gives its lock back
  (``pipelines.output.lock``);
- row ids are compared in one string form (``id_strings``) on write, resume and audit;
- the audit checks that every id a run answers for has exactly one output row, in bounded memory
  (``pipelines.output.ids``: hash buckets of at most about a million ids).
"""

from __future__ import annotations

import json
import logging
import re
import time
import uuid
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipelines.output.ids import IdColumn, array_batches, id_strings, partition
from pipelines.storage import filesystem_for, is_object_store
from schemas.errors import JobError
from schemas.job import OutputConfig
from schemas.multitask import TASK_PREFIX
from schemas.output import OutputShape

logger = logging.getLogger(__name__)

PART_PREFIX = "part-"
TMP_DIR = "_tmp"  # pyarrow and Ray ignore names starting with '_' or '.' when reading a directory
STAGING_PREFIX = "_staging-"  # an overwrite run's committed parts, until the swap
MARKER_PREFIX = "_committed-"
COMMIT_INDEX = "_committed.json"  # every run's marker in one object, read by name: no listing involved
# Runs whose marker is followed by a swap of staged parts (finished by the next run if cut short): an
# overwrite, and a retry of error rows (``pipelines.output.retry``).
SWAPPING_MODES = ("overwrite", "retry")


def _fs_and_path(uri: str) -> tuple[pafs.FileSystem, str]:
    return filesystem_for(uri)


def _exists(fs: pafs.FileSystem, path: str) -> bool:
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def _name(path: str) -> str:
    return path.rsplit("/", 1)[-1]


def staging_name(run_id: str) -> str:
    return f"{STAGING_PREFIX}{run_id}"


def _parts_in(fs: pafs.FileSystem, directory: str) -> list[str]:
    if fs.get_file_info(directory).type != pafs.FileType.Directory:
        return []
    return sorted(
        f.path for f in fs.get_file_info(pafs.FileSelector(directory, recursive=False))
        if f.type == pafs.FileType.File and f.base_name.startswith(PART_PREFIX) and f.base_name.endswith(".parquet")
    )  # fmt: skip


def committed_parts(uri: str) -> list[str]:
    """The output's part files: every ``part-*.parquet`` directly under ``uri`` (what readers read), as
    the commit markers correct a listing that lags behind writes and deletes: parts a finished run's
    marker names are included when they exist (asked by name, which does not lag), parts an overwrite
    replaced are left out."""
    fs, root = _fs_and_path(uri)
    listed = {_name(p) for p in _parts_in(fs, root)}
    named, replaced = set(), set()
    for marker in _markers(fs, root):
        named.update(marker.get("parts", []))  # an overwrite's: those its swap already moved in
        replaced.update(marker.get("replaces", []))
    late = {n for n in named - listed - replaced if _exists(fs, f"{root}/{n}")}
    if late:
        logger.info("output %s: %d committed parts not listed yet (the store's listing lags)", uri, len(late))
    return sorted(f"{root}/{n}" for n in (listed | late) - replaced)


def _is_dir(fs: pafs.FileSystem, path: str) -> bool:
    return fs.get_file_info(path).type == pafs.FileType.Directory


def committed_ids(uri: str) -> pa.Array:
    """Ids (string form) of every row in the output's part files (empty when there are none)."""
    parts = committed_parts(uri)
    if not parts:
        return pa.array([], pa.string())
    fs, _ = _fs_and_path(uri)
    table = pads.dataset(parts, filesystem=fs, format="parquet").to_table(columns=["id"])
    return id_strings(table.column("id"))


def check_output_mode(config: OutputConfig) -> None:
    """Refuse, before anything is touched, a run the output's state forbids (read-only)."""
    fs, root = _fs_and_path(config.path)
    kind = fs.get_file_info(root).type
    if kind == pafs.FileType.File:
        raise JobError(
            f"output.path {config.path} is a file; the output is a directory of part files. "
            "Try a directory path (CLI: --output)."
        )
    if config.mode == "error" and (parts := _parts_in(fs, root)):
        raise JobError(
            f"output {config.path} already holds {len(parts)} part files and output.mode is 'error'. "
            "Try output.mode: resume (skip rows already done) or overwrite (replace them) (CLI: --mode)."
        )
    if config.mode == "overwrite" and (strays := _strays(config.path)):
        raise JobError(
            f"output {config.path} holds {len(strays)} part files no run of this output wrote (no commit "
            f"marker names them; first: {', '.join(strays[:3])}). An overwrite deletes only the parts its "
            "runs committed, so these would stay in the new output. Try moving them out of the output "
            "directory (or deleting them if they are not needed), or another output.path (CLI: --output)."
        )


def _named_parts(markers: Iterable[dict]) -> set[str]:
    """The parts the runs of this output committed: every part its commit markers name."""
    return {name for marker in markers for name in marker.get("parts", [])}


def _strays(uri: str) -> list[str]:
    """Part files in the output that no run of it committed: not named by a commit marker, nor by the name
    of the run holding the output's lock (still writing, or killed: the run taking its lock over names its
    parts in a marker first)."""
    from pipelines.output.lock import read_lock

    fs, root = _fs_and_path(uri)
    named = _named_parts(_markers(fs, root))
    holder = read_lock(uri)
    writing = _parts_of(holder.run_id) if holder else None
    return [
        _name(p) for p in _parts_in(fs, root)
        if _name(p) not in named and not (writing and writing.fullmatch(_name(p)))
    ]  # fmt: skip


def check_run_id_unused(uri: str, run_id: str) -> None:
    """Refuse a run id the output already knows: its part names would replace that run's parts."""
    fs, root = _fs_and_path(uri)
    names = [f"{MARKER_PREFIX}{run_id}.json"] if run_id in {m["run_id"] for m in _markers(fs, root)} else []
    if not names and fs.get_file_info(root).type == pafs.FileType.Directory:  # the index read by name first
        own = _parts_of(run_id)
        names = [
            f.base_name for f in fs.get_file_info(pafs.FileSelector(root, recursive=False))
            if own.fullmatch(f.base_name) or f.base_name in (f"{MARKER_PREFIX}{run_id}.json", f"_run-{run_id}.json")
        ]  # fmt: skip
    if names:
        raise JobError(
            f"run id {run_id} already wrote to output {uri} ({names[0]}); a second run under it would "
            "replace that run's parts. Try another --run-id, or leave it out for a fresh one."
        )


def prepare_output(config: OutputConfig) -> pa.Array:
    """Make the output ready for a run that holds its lock (``pipelines.output.lock``); return the ids to skip
    (non-empty only when resuming). Finishes a swap an earlier overwrite left half done, removes what
    interrupted runs left behind, then checks the mode. An overwrite deletes nothing here: the old parts
    stay until the new run swaps its own in (``commit_run``)."""
    fs, root = _fs_and_path(config.path)
    check_output_mode(config)
    fs.create_dir(root, recursive=True)
    finish_interrupted_swaps(config.path)
    remove_stale_files(config.path)
    check_output_mode(config)  # a finished swap may have added parts
    return committed_ids(config.path) if config.mode == "resume" else pa.array([], pa.string())


def _markers(fs: pafs.FileSystem, root: str) -> list[dict]:
    """Every finished run's commit marker: those in the commit index ``_committed.json`` (read by name,
    so a lagging listing cannot hide one) and any marker file the index lacks (a run that died between
    writing its marker and the index, or an output written before the index existed)."""
    found = {m["run_id"]: m for m in _read_index(fs, root)}
    if not _is_dir(fs, root):
        return list(found.values())
    for f in fs.get_file_info(pafs.FileSelector(root, recursive=False)):
        if (
            f.type == pafs.FileType.File
            and f.base_name.startswith(MARKER_PREFIX)
            and f.base_name.endswith(".json")
            and f.base_name[len(MARKER_PREFIX) : -len(".json")] not in found
        ):
            with fs.open_input_stream(f.path) as stream:
                marker = json.loads(stream.read())
            found[marker["run_id"]] = marker
    return list(found.values())


def _read_index(fs: pafs.FileSystem, root: str) -> list[dict]:
    try:
        with fs.open_input_stream(f"{root}/{COMMIT_INDEX}") as stream:
            return json.loads(stream.read())["runs"]
    except FileNotFoundError:
        return []


def finish_interrupted_swaps(uri: str) -> list[str]:
    """Finish each overwrite whose marker was written but whose staging directory is still there (the
    run died mid-swap): the marker decided the swap, so it is rolled forward. Returns their run ids."""
    fs, root = _fs_and_path(uri)
    finished = []
    for marker in _markers(fs, root):
        if marker.get("mode") in SWAPPING_MODES and _exists(fs, f"{root}/{staging_name(marker['run_id'])}"):
            logger.warning(
                "output %s: finishing the swap of overwrite run %s, cut short", uri, marker["run_id"]
            )
            _swap(fs, root, marker)
            finished.append(marker["run_id"])
    return finished


def remove_stale_files(uri: str) -> int:
    """Remove what interrupted runs left: half-written files in ``_tmp/``, staging directories of overwrite
    runs that never committed, lock temporaries. Only safe with the output's lock held."""
    fs, root = _fs_and_path(uri)
    removed = 0
    for f in fs.get_file_info(pafs.FileSelector(root, recursive=False)):
        name = f.base_name
        if f.type == pafs.FileType.Directory and (name == TMP_DIR or name.startswith(STAGING_PREFIX)):
            removed += sum(
                1
                for g in fs.get_file_info(pafs.FileSelector(f.path, recursive=True))
                if g.type == pafs.FileType.File
            )
            if name == TMP_DIR:
                fs.delete_dir_contents(f.path)
            else:
                fs.delete_dir(f.path)
        elif f.type == pafs.FileType.File and name.startswith("_lock.") and name != "_lock":
            fs.delete_file(f.path)
            removed += 1
    if removed:
        logger.warning("output %s: removed %d stale temporary files left by interrupted runs", uri, removed)
    return removed


def commit_run(uri: str, run_id: str, mode: str, parts: list[str]) -> dict:
    """Record what a finished run committed in ``_committed-<run_id>.json``; for an overwrite, swap its
    staged parts in for every old part (the marker is written first, so a swap cut short is finished by
    the next run). Returns the marker."""
    fs, root = _fs_and_path(uri)
    if mode == "overwrite":
        # the parts the run reports, plus any a retried task left that it no longer reports
        parts = sorted({*parts, *(_name(p) for p in _parts_in(fs, f"{root}/{staging_name(run_id)}"))})
        # only parts this output's runs committed: a part file none of them wrote is never deleted
        named = _named_parts(_markers(fs, root))
        replaces = [n for n in map(_name, committed_parts(uri)) if n not in parts and n in named]
    else:
        replaces = []
    marker = {
        "run_id": run_id,
        "mode": mode,
        "parts": sorted(parts),
        "replaces": replaces,
        "committed_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    _write_marker(fs, root, marker)
    if mode == "overwrite":
        _swap(fs, root, marker)
    return marker


def _write_marker(fs: pafs.FileSystem, root: str, marker: dict) -> None:
    run_id = marker["run_id"]
    _write_atomically(fs, root, f"{MARKER_PREFIX}{run_id}.json", json.dumps(marker, indent=1).encode())
    # Only the run holding the output's lock writes here, so rewriting the index cannot lose another's entry.
    runs = [m for m in _markers(fs, root) if m["run_id"] != run_id] + [marker]
    _write_atomically(fs, root, COMMIT_INDEX, json.dumps({"runs": runs}).encode())


def record_interrupted_run(uri: str, run_id: str, writers: int) -> dict | None:
    """Give a run that died holding the output's lock the commit marker it never wrote (mode
    ``interrupted``), naming the parts it committed in the output directory, so resume and the audit
    count them even where a listing lags behind writes. They are found by name as well as listed: each of
    the run's ``writers`` numbers its parts from 0 and commits them in order. Called, holding the lock, by
    the run that took it over; returns the marker, or None when there is nothing to record."""
    fs, root = _fs_and_path(uri)
    if any(m["run_id"] == run_id for m in _markers(fs, root)):
        return None
    parts = {_name(p) for p in _parts_in(fs, root) if _parts_of(run_id).fullmatch(_name(p))}
    for index in range(writers):
        n = 0
        while (name := part_name(run_id, index, n)) in parts or _exists(fs, f"{root}/{name}"):
            parts.add(name)
            n += 1
    if not parts:
        return None
    marker = {"run_id": run_id, "mode": "interrupted", "parts": sorted(parts), "replaces": [],
              "committed_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}  # fmt: skip
    _write_marker(fs, root, marker)
    logger.warning("output %s: recorded the %d parts interrupted run %s committed", uri, len(parts), run_id)
    return marker


def _swap(fs: pafs.FileSystem, root: str, marker: dict) -> None:
    # New parts in first, old ones out second: a reader meanwhile sees every old row or every new one
    # (for a moment both), never an empty output.
    staging = f"{root}/{staging_name(marker['run_id'])}"
    for name in marker["parts"]:
        if _exists(fs, f"{staging}/{name}"):
            fs.move(f"{staging}/{name}", f"{root}/{name}")
    named = _named_parts(m for m in _markers(fs, root) if m["run_id"] != marker["run_id"])
    for name in marker["replaces"]:
        if name not in named:  # a marker written before this rule may name a file no run wrote: kept
            logger.warning("output %s: kept %s, which no run of this output wrote", root, name)
        elif _exists(fs, f"{root}/{name}"):
            fs.delete_file(f"{root}/{name}")
    ours = named | set(marker["parts"])
    if strays := [n for n in map(_name, _parts_in(fs, root)) if n not in ours]:
        logger.warning(
            "output %s: %d part files no run of this output wrote stay beside the new output (first: %s)",
            root, len(strays), ", ".join(strays[:3]),
        )  # fmt: skip
    if _exists(fs, staging):
        fs.delete_dir(staging)


def _write_atomically(fs: pafs.FileSystem, root: str, name: str, data: bytes) -> None:
    if is_object_store(fs):  # an upload appears whole or not at all
        _upload(fs, f"{root}/{name}", data)
        return
    fs.create_dir(f"{root}/{TMP_DIR}", recursive=True)
    tmp = f"{root}/{TMP_DIR}/{name}.{uuid.uuid4().hex}"
    with fs.open_output_stream(tmp) as sink:
        sink.write(data)
    fs.move(tmp, f"{root}/{name}")


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
    from pipelines.output.lock import assert_lock_held

    fs, root = _fs_and_path(uri)
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
            if _exists(fs, tmp):  # the next run would remove it too; no need to leave it until then
                fs.delete_file(tmp)
            raise
        stats.files.append(name)
    return stats


def _parts_of(run_id: str) -> re.Pattern:
    """The names ``part_name`` gives a run's parts."""
    return re.compile(rf"{PART_PREFIX}{re.escape(run_id)}-\d{{6}}-\d{{4,}}\.parquet")


def part_name(run_id: str, task_idx: int, chunk_idx: int) -> str:
    # Unique in a run: writers number their parts on. The same name written again (a test's retry)
    # replaces the earlier file instead of adding to it.
    return f"{PART_PREFIX}{run_id}-{task_idx:06d}-{chunk_idx:04d}.parquet"


def _upload_part_files(
    fs, table, stats, dest, uri, run_id, task_idx, rows_per_file, first_chunk, lock_run_id
):
    """Object stores: each part is serialised in memory, then uploaded under its final name in one
    upload, which the store shows only once it is complete (no ``_tmp/``, no copy: there is no rename)."""
    from pipelines.output.lock import assert_lock_held

    for chunk_idx, offset in enumerate(range(0, table.num_rows, rows_per_file), start=first_chunk):
        name = part_name(run_id, task_idx, chunk_idx)
        buffer = pa.BufferOutputStream()
        pq.write_table(table.slice(offset, rows_per_file), buffer, compression="zstd")
        if lock_run_id is not None:
            assert_lock_held(uri, lock_run_id)
        _upload(fs, f"{dest}/{name}", buffer.getvalue())
        stats.files.append(name)
    return stats


def _upload(fs: pafs.FileSystem, path: str, data) -> None:
    # Not `with`: a failed write must not be followed by a close, which would complete the upload.
    stream = fs.open_output_stream(path)
    stream.write(data)
    stream.close()


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
    the end, in this process (``pipelines.output.writer.PartWriter``, with no time limit: nothing ticks here)."""
    from pipelines.output.writer import PartWriter

    writer = PartWriter(uri, run_id, index, part_rows, into=into, lock_run_id=lock_run_id)
    for table in tables:
        writer.add(table)
    return writer.close()


def write_manifest(uri: str, run_id: str, summary: dict, plot_png: bytes | None = None) -> None:
    """``_run-<run_id>.json`` beside the output, written last (its appearance says the run is over); the
    run's rate plot ``_run-<run_id>.png`` just before it."""
    fs, root = _fs_and_path(uri)
    if plot_png is not None:
        _write_atomically(fs, root, f"_run-{run_id}.png", plot_png)
    _write_atomically(fs, root, f"_run-{run_id}.json", json.dumps(summary, indent=1, default=str).encode())


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
    fs, root = _fs_and_path(uri)
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
