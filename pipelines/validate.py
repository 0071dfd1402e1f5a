"""Checks a job before it touches anything: model directory, input files, schema, ids, and the output
(apart from the input, reachable, writable, its mode).

    plan = validate_job(config)   # JobError: one line naming the file, key or path, ending in "Try ..."

Reads only what it must: directory listings, the Parquet files' footers (their schemas and row counts)
and the id column, streamed batch by batch and checked in hash buckets of at most about a million ids
(``pipelines.output.ids``), so validation's memory does not grow with the input. Needs no Ray, so ``python -m jobs.run`` answers a mistake in seconds and exits 2 having changed
nothing. Files are listed as Ray reads them: ``*.parquet`` below ``input.path``, skipping names that start
with ``_`` or ``.``.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from actors.engines.adapters import adapter_rank, resolve_adapters
from pipelines.output.ids import IdColumn, IdReadError, partition, shown
from pipelines.output.prepare import check_output_mode, check_run_id_unused
from schemas.adapters import ADAPTERS, CONFIG_FILE, engine_lora_rank
from schemas.errors import JobError
from schemas.job import JobConfig, ModelConfig
from schemas.model import PHI4MM, Adapter
from schemas.redact import redact
from schemas.storage import (
    filesystem_for,
    is_object_store,
    location,
    unreachable,
    unwritable,
    use,
    within,
)
from schemas.task import TaskConfig

logger = logging.getLogger(__name__)

_SHOWN = 5  # offending ids or rows named in one message


@dataclass(frozen=True)
class JobPlan:
    """What validation learnt, for the run: the input files and schema, where the ids are, and the ids of
    a --limit run. Not every input id: those are streamed again from ``input_ids`` when needed."""

    files: list[str]
    schema: pa.Schema
    input_ids: IdColumn  # the input's id column (files, column, row count), streamed, never held whole
    # A --limit run's ids: the first input.limit in input order, in string form. None: every input id.
    run_ids: pa.Array | None
    # The adapters in use, as local folders on this node (the job's own remote ones copied); {}: no LoRA.
    adapters: dict[Adapter, Path] = field(default_factory=dict)

    @property
    def input_rows(self) -> int:
        return self.input_ids.rows


def validate_job(config: JobConfig, run_id: str | None = None, writes: bool = True) -> JobPlan:
    """Every job-level check; raises JobError on the first failure. The quick ones first (the model
    folder, the input's files and columns, the output), then the slow ones (remote adapters copied, the
    input's ids read). With ``run_id``, also refuses a run id the output already holds parts of.
    ``writes``: the job will write its output (not a dry run), so a local output must be writable."""
    use(config.storage)  # this process's s3:// endpoint, region, timeouts (schemas.storage)
    check_model(config.model)
    fs, files = input_files(config.input.path)
    schema, rows = input_schema(fs, files, config.input.path)
    check_input_columns(config, schema)
    check_output(config, files, writes)
    if run_id is not None:
        check_run_id_unused(config.output.path, run_id)
    # The slow checks last, so that a mistake above costs no adapter download and no id scan.
    adapters = check_adapters(config)  # remote adapters are copied into this node's cache here
    root = filesystem_for(config.input.path)[1] if config.input.derived_ids else None
    input_ids = IdColumn(fs, tuple(files), config.input.columns.id, config.input.path, rows, root)
    run_ids = check_ids(input_ids, config.input.limit)  # reads the input's whole id column
    return JobPlan(files, with_id_column(config, schema), input_ids, run_ids, adapters)


def with_id_column(config: JobConfig, schema: pa.Schema) -> pa.Schema:
    """The input's schema as its rows are read: with derived ids, their string column appended."""
    if not config.input.derived_ids:
        return schema
    return schema.append(pa.field(config.input.columns.id, pa.string()))


def check_model(model: ModelConfig) -> None:
    if "://" in model.path:  # a remote checkpoint: the engine's loader reports on it
        return
    path = Path(model.path)
    if not path.is_dir():
        what = "is not a directory" if path.exists() else "does not exist"
        raise JobError(
            f"model.path {model.path} {what}. Try the local directory of a Phi-4-multimodal checkpoint "
            "(CLI: --model); `python -m jobs.make_tiny_model DIR` writes a tiny test one."
        )
    if not (path / "config.json").is_file():
        raise JobError(
            f"model.path {model.path} has no config.json, so it is not a checkpoint directory. Try the "
            "checkpoint's top directory (the one with config.json and the LoRA folders)."
        )
    if model.use_lora:
        for adapter in ADAPTERS:
            folder = PHI4MM.adapter_dir(adapter)
            if adapter not in model.adapters.custom() and not (path / folder / CONFIG_FILE).is_file():
                raise JobError(
                    f"model.path {model.path} has no {folder}/{CONFIG_FILE}, which model.use_lora needs. Try "
                    f"the original checkpoint layout, model.adapters.{adapter} with your own adapter, or "
                    "model.use_lora: false for the base model."
                )


def check_adapters(config: JobConfig) -> dict[Adapter, Path]:
    """The job's own adapters (``model.adapters``) pass every check of ``schemas.adapters``, remote ones
    copied into this node's cache first (``actors.engines.adapters``); a ``model.max_lora_rank`` covers
    every adapter in use. Returns the adapters' local folders ({} without LoRA)."""
    model = config.model
    if not model.use_lora:
        return {}
    dirs = resolve_adapters(model, config.storage)
    local = {a: d for a, d in dirs.items() if a in model.adapters.custom() or "://" not in model.path}
    ranks = {a: adapter_rank(d, f"the {a} adapter") for a, d in local.items()}  # as the engine will
    if model.max_lora_rank and ranks:
        adapter, rank = max(ranks.items(), key=lambda t: t[1])
        if model.max_lora_rank < rank:
            raise JobError(
                f"model.max_lora_rank {model.max_lora_rank} is below the rank of the {adapter} adapter ({rank}). "
                f"Try max_lora_rank: {engine_lora_rank(rank)}, or leave it out to size it from the adapters."
            )
    return dirs


_shown = shown


def input_files(uri: str) -> tuple[pafs.FileSystem, list[str]]:
    """The Parquet files Ray reads for ``input.path``, in path order."""
    fs, root, info = _reach("input.path", uri)
    if info.type == pafs.FileType.NotFound:
        raise JobError(
            f"input.path {uri} does not exist. Try the path of a Parquet file or of a directory of them (CLI: --input)."
        )
    if info.type == pafs.FileType.File:
        return fs, [root]
    files = []
    for f in fs.get_file_info(pafs.FileSelector(root, recursive=True)):
        parts = f.path[len(root) :].strip("/").split("/")
        if f.type == pafs.FileType.File and f.base_name.lower().endswith(".parquet"):
            if not any(p.startswith(("_", ".")) for p in parts):
                files.append(f.path)
    if not files:
        raise JobError(
            f"input.path {uri} holds no .parquet files (names starting with '_' or '.' are skipped). "
            "Try the directory the Parquet files are in."
        )
    return fs, sorted(files)


def _reach(key: str, uri: str) -> tuple[pafs.FileSystem, str, pafs.FileInfo]:
    """The file system, path and file info of ``key``'s ``uri``; a URI pyarrow cannot open, a store that
    answers with an error (after its retries) or never answers, and a bucket that does not exist are
    JobErrors naming ``key``."""
    try:
        fs, root = filesystem_for(uri)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, ValueError) as e:
        raise JobError(
            f"{key} {uri} cannot be opened ({e}). Try a local path or a URL pyarrow opens (s3://, gs://, hdfs://)."
        ) from None
    bucket = root.split("/", 1)[0]
    try:
        info = fs.get_file_info(root)
        missing = info.type == pafs.FileType.NotFound and is_object_store(fs) and bucket not in ("", root)
        if missing and fs.get_file_info(bucket).type == pafs.FileType.NotFound:
            raise JobError(
                f"{key} {redact(uri)}: its bucket {bucket} does not exist. Try the name of a bucket that "
                "exists (or create it), and check storage.s3_endpoint."
            )
    except OSError as e:
        raise unreachable(key, uri, e) from None
    return fs, root, info


def input_schema(fs: pafs.FileSystem, files: list[str], uri: str) -> tuple[pa.Schema, int]:
    """The schema of all files together and their row count, read from their footers; names the file
    that is not Parquet and the column whose types cannot be merged."""

    def read(path: str) -> tuple[pa.Schema, int]:
        try:
            with pq.ParquetFile(path, filesystem=fs) as f:
                return f.schema_arrow, f.metadata.num_rows
        except (pa.ArrowInvalid, OSError) as e:
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise JobError(
                f"input file {_shown(uri, path)} is not a readable Parquet file ({reason}). Try removing or "
                "replacing it, or renaming it to start with '_' so it is skipped."
            ) from None

    # Footers are small reads; on object stores their latency dominates, so read several at once.
    with ThreadPoolExecutor(max_workers=min(16, len(files))) as pool:
        schemas, rows = zip(*pool.map(read, files), strict=True)
    schemas = list(schemas)
    try:
        # As Ray merges them: 'permissive' widens int32 + int64 and fills columns some files lack.
        return pa.unify_schemas(schemas, promote_options="permissive"), sum(rows)
    except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
        reason = str(e).splitlines()[0]
        raise JobError(
            _schema_conflict(files, schemas, uri)
            or f"input files of {uri} cannot be read as one table ({reason}). Try files of one schema."
        ) from None


def _schema_conflict(files: list[str], schemas: list[pa.Schema], uri: str) -> str | None:
    first: dict[str, tuple[str, pa.Field]] = {}
    for path, schema in zip(files, schemas, strict=True):
        for f in schema:
            if f.name not in first:
                first[f.name] = (path, f)
                continue
            other_path, other = first[f.name]
            try:
                pa.unify_schemas([pa.schema([other]), pa.schema([f])], promote_options="permissive")
            except (pa.ArrowInvalid, pa.ArrowTypeError):
                return (
                    f"input column {f.name!r} is {other.type} in {_shown(uri, other_path)} but {f.type} in "
                    f"{_shown(uri, path)}, so the files cannot be read as one table. Try rewriting them with one "
                    f"type for {f.name!r}, or pointing input.path at files of one schema."
                )
    return None


def check_input_columns(config: JobConfig, schema: pa.Schema) -> None:
    """Fail before any actor starts when the configured columns do not match the data."""
    cols = config.input.columns
    names = set(schema.names)
    if config.input.derived_ids and cols.id in names:
        raise JobError(
            f"input {config.input.path} has a column {cols.id!r}, and input.derived_ids would write the "
            f"derived ids in its place. Try input.columns.id: {cols.id} without input.derived_ids to use "
            "that column as the ids, or input.columns.id with another name for the derived ones."
        )
    if not config.input.derived_ids and cols.id not in names:
        raise JobError(
            f"input {config.input.path} has no id column {cols.id!r} (columns: {sorted(names)}). "
            "Try input.columns.id with the name of a unique key column, or input.derived_ids: true for "
            "ids made from each row's file and row ('<file>:<row>', as for a Hugging Face datasets export)."
        )
    content = [c for c in (cols.image, cols.audio, cols.prompt) if c]
    # a task's template may read text columns only: the task checks below name what it needs
    if not any(c in names for c in content) and not (config.task or config.tasks):
        raise JobError(
            f"input {config.input.path} has none of the columns {content} (columns: {sorted(names)}). "
            "Try setting input.columns.image / audio / prompt to the names your data uses."
        )
    for c in content:
        if c not in names:
            logger.info("input has no %r column; treating it as empty", c)
    if config.task:
        check_task_columns(config.task, "task", config, names)
    for name, task in (config.tasks or {}).items():
        check_task_columns(task, f"tasks.{name}", config, names)
    if missing := [c for c in config.output.carry_columns if c not in names]:
        raise JobError(
            f"output.carry_columns names {missing}, which the input {config.input.path} lacks (columns: "
            f"{sorted(names)}). Try the names your data uses."
        )


def check_task_columns(task: TaskConfig, key: str, config: JobConfig, names: set[str]) -> None:
    """The columns a task (the config section ``key``) reads: its media column configured and present, its
    template's columns present."""
    cols = config.input.columns
    if task.reads != "any":
        column = getattr(cols, task.reads)
        if not column or column not in names:
            raise JobError(
                f"{key}.preset {task.preset} reads the {task.reads} column, but input.columns.{task.reads} is "
                f"{column!r} and the input's columns are {sorted(names)}. Try input.columns.{task.reads} with "
                "the name your data uses."
            )
    if missing := [c for c in task.row_columns if c not in names]:
        what = f"{key}.question_column" if task.preset == "vqa" and not task.template else f"{key}.template"
        raise JobError(
            f"{what} reads the input column(s) {missing}, which the input {config.input.path} lacks (columns: "
            f"{sorted(names)}). Try the names your data uses."
        )


_CHECK_SCHEMA = pa.schema([("id", pa.string()), ("row", pa.int64())])  # row: position in the input


def check_ids(ids: IdColumn, limit: int | None = None) -> pa.Array | None:
    """Refuse null, empty and repeated ids, naming the first ones in input order (files in path order,
    rows in file order); return the first ``limit`` ids (None without a limit).

    One streaming pass over the id column (that column only): blanks are counted on the way, and the ids
    go into hash buckets (``pipelines.output.ids.partition``) where repeats are counted one bucket at a time, so
    the driver holds about a million ids at most, whatever the input's size. A --limit run's first ids
    are few and kept. Derived ids are unique and never blank by construction: only the first are read."""
    if ids.root is not None:
        return _first(_translated(ids), limit) if limit else None
    blanks = _Blanks(ids.uri)
    first: list[pa.Array] = []

    def tables() -> Iterator[pa.Table]:
        row, wanted = 0, limit or 0
        for path, file_row, batch in _translated(ids):
            blanks.add(path, file_row, batch)
            if wanted:
                first.append(batch[:wanted])
                wanted -= len(first[-1])
            yield pa.table({"id": batch, "row": pa.arange(row, row + len(batch))})
            row += len(batch)

    with partition(tables(), ids.rows, _CHECK_SCHEMA) as buckets:
        blanks.refuse(ids.column)  # the pass is complete: every blank is counted
        _refuse_repeated(buckets, ids.column)
    if not limit:
        return None
    return pa.concat_arrays(first) if first else pa.array([], pa.string())


def _first(batches: Iterator[tuple[str, int, pa.Array]], limit: int) -> pa.Array:
    """The first ``limit`` ids of ``batches``, reading no further."""
    first, wanted = [], limit
    for _, _, batch in batches:
        first.append(batch[:wanted])
        wanted -= len(first[-1])
        if not wanted:
            break
    return pa.concat_arrays(first) if first else pa.array([], pa.string())


def _translated(ids: IdColumn) -> Iterator[tuple[str, int, pa.Array]]:
    """The id column's batches, with a read failure turned into the JobError that names the file."""
    try:
        yield from ids.batches()
    except IdReadError as e:
        where = _shown(ids.uri, e.path)
        if e.kind == "text":
            raise JobError(
                f"input.columns.id {ids.column!r} in {where} is {e.id_type}, whose values have no text form "
                f"({e.reason}). Try an id column of strings or integers."
            ) from None
        raise JobError(
            f"input file {where}: its id column {ids.column!r} cannot be read ({e.reason}). "
            "Try rewriting the file, or check input.columns.id."
        ) from None


class _Blanks:
    """Null or empty ids seen so far: how many, and where the first ones are."""

    def __init__(self, uri: str):
        self.uri, self.count, self.first = uri, 0, []

    def add(self, path: str, file_row: int, ids: pa.Array) -> None:
        blank = pc.fill_null(pc.or_kleene(pc.is_null(ids), pc.equal(ids, "")), True)
        n = int(pc.sum(blank).as_py() or 0)
        if not n:
            return
        for row in pc.indices_nonzero(blank).to_pylist()[: _SHOWN - len(self.first)]:
            self.first.append(f"{_shown(self.uri, path)} row {file_row + row}")
        self.count += n

    def refuse(self, column: str) -> None:
        if self.count:
            raise JobError(
                f"input.columns.id {column!r} is null or empty in {self.count} rows (first: "
                f"{', '.join(self.first)}). Every row needs its own id: resume and the audit match rows by "
                "it. Try filling them in, or another input.columns.id."
            )


_REPEATED_SCHEMA = pa.schema([("id", pa.string()), ("row_min", pa.int64()), ("count_all", pa.int64())])


def _refuse_repeated(buckets: Iterable[pa.Table], column: str) -> None:
    """Repeated ids, bucket by bucket; keeps only the _SHOWN that occur first and a count of the rest."""
    first, repeated = _REPEATED_SCHEMA.empty_table(), 0
    for bucket in buckets:
        counts = bucket.group_by("id").aggregate([("row", "min"), ([], "count_all")])
        counts = counts.filter(pc.greater(counts.column("count_all"), 1))
        repeated += counts.num_rows
        both = pa.concat_tables([first, counts.select(_REPEATED_SCHEMA.names).cast(_REPEATED_SCHEMA)])
        first = both.sort_by("row_min").slice(0, _SHOWN)  # as the whole input's first repeats would be
    if not repeated:
        return
    names = ", ".join(f"{r['id']!r} x{r['count_all']}" for r in first.to_pylist())
    more = f" and {repeated - _SHOWN} more" if repeated > _SHOWN else ""
    raise JobError(
        f"input.columns.id {column!r} is not unique; repeated ids: {names}{more}. Resume and the audit match "
        "rows by id. Try de-duplicating the input, or a unique column as input.columns.id."
    )


def check_output(config: JobConfig, files: list[str], writes: bool = True) -> None:
    """The output can be reached, does not overlap the input in any direction (``files``: the input's),
    and its state allows the mode; with ``writes``, a local output can also be created and written (on
    an object store, taking the lock is the first write: ``pipelines.output.lock``)."""
    out, inp = config.output.path, config.input.path
    fs, root, _ = _reach("output.path", out)
    out_at, in_at = location(out), location(inp)
    if within(in_at, out_at):
        raise JobError(
            f"input.path {inp} is output.path {out} or inside it: its files would be taken for the output's "
            "part files (resume would skip their rows, an overwrite would delete them). Try an input outside "
            "the output directory, or another output.path (CLI: --output)."
        )
    if within(out_at, in_at):
        raise JobError(
            f"output.path {out} is inside input.path {inp}: the next run would read its part files as input. "
            "Try an output directory outside the input."
        )
    if in_at[0] == out_at[0] == "local":  # an input file may be a link to one of the output's files
        if linked := next((f for f in files if within(location(f), out_at)), None):
            raise JobError(
                f"input file {linked} is a link into output.path {out}: the output's part files must not be "
                "read as input. Try copying the file into the input, or another output.path (CLI: --output)."
            )
    check_output_mode(config.output)
    if writes and not is_object_store(fs):
        _try_writing(root, out)


def _try_writing(root: str, uri: str) -> None:
    """Create and remove a directory where the run will first write: in the output directory, or where
    the missing part of its path will be created. Nothing is left behind."""
    existing = Path(root)
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    try:
        os.rmdir(tempfile.mkdtemp(prefix="_probe-", dir=existing))
    except OSError as e:  # /proc, /sys, a read-only mount, a directory of someone else's, a file
        raise unwritable(uri, e) from None
