"""Checks a job before it touches anything: model directory, input files, schema, ids, output mode.

    plan = validate_job(config)   # JobError: one line naming the file, key or path, ending in "Try ..."

Reads only what it must: directory listings, the Parquet files' footers (their schemas) and the id
column. Needs no Ray, so ``python -m jobs.run`` answers a mistake in seconds and exits 2 having changed
nothing. Files are listed as Ray reads them: ``*.parquet`` below ``input.path``, skipping names that start
with ``_`` or ``.``.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipelines.io import check_output_mode, check_run_id_unused, id_strings
from schemas.errors import JobError
from schemas.job import JobConfig, ModelConfig
from schemas.model import PHI4MM

logger = logging.getLogger(__name__)

_SHOWN = 5  # offending ids or rows named in one message


@dataclass(frozen=True)
class JobPlan:
    """What validation learnt, for the run: the input files and schema, and the ids."""

    files: list[str]
    schema: pa.Schema
    input_ids: pa.Array  # every input id in string form (pipelines.io.id_strings), in input order
    run_ids: pa.Array  # the ids this run answers for: all, or the first input.limit in input order


def validate_job(config: JobConfig, run_id: str | None = None) -> JobPlan:
    """Every job-level check, in the order a user would fix them; raises JobError on the first failure.
    With ``run_id``, also refuses a run id the output already holds parts of."""
    check_model(config.model)
    fs, files = input_files(config.input.path)
    schema = input_schema(fs, files, config.input.path)
    check_input_columns(config, schema)
    input_ids = read_ids(fs, files, config.input.path, config.input.columns.id)
    check_output(config)
    if run_id is not None:
        check_run_id_unused(config.output.path, run_id)
    limit = config.input.limit
    return JobPlan(files, schema, input_ids, input_ids[:limit] if limit else input_ids)


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
        for adapter in (PHI4MM.vision_lora_dir, PHI4MM.speech_lora_dir):
            if not (path / adapter / "adapter_config.json").is_file():
                raise JobError(
                    f"model.path {model.path} has no {adapter}/adapter_config.json, which model.use_lora "
                    "needs. Try the original checkpoint layout, or model.use_lora: false for the base model."
                )


def _shown(uri: str, path: str) -> str:
    """A file as the user knows it: with its URL scheme when the input is a URL."""
    return f"{uri.split('://', 1)[0]}://{path}" if "://" in uri else path


def input_files(uri: str) -> tuple[pafs.FileSystem, list[str]]:
    """The Parquet files Ray reads for ``input.path``, in path order."""
    try:
        fs, root = pafs.FileSystem.from_uri(uri)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, ValueError) as e:
        raise JobError(
            f"input.path {uri} cannot be opened ({e}). Try a local path or a URL pyarrow opens (s3://, gs://, hdfs://)."
        ) from None
    info = fs.get_file_info(root)
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


def input_schema(fs: pafs.FileSystem, files: list[str], uri: str) -> pa.Schema:
    """The schema of all files together, read from their footers; names the file that is not Parquet
    and the column whose types cannot be merged."""

    def read(path: str) -> pa.Schema:
        try:
            return pq.read_schema(path, filesystem=fs)
        except (pa.ArrowInvalid, OSError) as e:
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise JobError(
                f"input file {_shown(uri, path)} is not a readable Parquet file ({reason}). Try removing or "
                "replacing it, or renaming it to start with '_' so it is skipped."
            ) from None

    # Footers are small reads; on object stores their latency dominates, so read several at once.
    with ThreadPoolExecutor(max_workers=min(16, len(files))) as pool:
        schemas = list(pool.map(read, files))
    try:
        # As Ray merges them: 'permissive' widens int32 + int64 and fills columns some files lack.
        return pa.unify_schemas(schemas, promote_options="permissive")
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
    if cols.id not in names:
        raise JobError(
            f"input {config.input.path} has no id column {cols.id!r} (columns: {sorted(names)}). "
            "Try input.columns.id with the name of a unique key column."
        )
    content = [c for c in (cols.image, cols.audio, cols.prompt) if c]
    if not any(c in names for c in content):
        raise JobError(
            f"input {config.input.path} has none of the columns {content} (columns: {sorted(names)}). "
            "Try setting input.columns.image / audio / prompt to the names your data uses."
        )
    for c in content:
        if c not in names:
            logger.info("input has no %r column; treating it as empty", c)


def read_ids(fs: pafs.FileSystem, files: list[str], uri: str, column: str) -> pa.Array:
    """Every input id in string form, in input order (files in path order, rows in file order); refuses
    null, empty and repeated ids. Reads the id column only, but of every row, and holds it on the driver
    (roughly 10-20 bytes per row beyond the ids themselves: ~0.5 GB for 10 M ids of 20 characters). The
    audit needs the same ids at the end of the run anyway."""

    def read(path: str) -> pa.Array:
        try:
            ids = pq.read_table(path, columns=[column], filesystem=fs).column(0)
        except (pa.ArrowInvalid, OSError) as e:
            raise JobError(
                f"input file {_shown(uri, path)}: its id column {column!r} cannot be read ({str(e).splitlines()[0]}). "
                "Try rewriting the file, or check input.columns.id."
            ) from None
        try:
            return id_strings(ids)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
            raise JobError(
                f"input.columns.id {column!r} in {_shown(uri, path)} is {ids.type}, whose values have no text form "
                f"({str(e).splitlines()[0]}). Try an id column of strings or integers."
            ) from None

    with ThreadPoolExecutor(max_workers=min(16, len(files))) as pool:  # object stores: latency-bound
        chunks = list(pool.map(read, files))
    blanks, count = [], 0
    for path, ids in zip(files, chunks, strict=True):
        blank = pc.fill_null(pc.or_kleene(pc.is_null(ids), pc.equal(ids, "")), True)
        for row in pc.indices_nonzero(blank).to_pylist()[: _SHOWN - len(blanks)]:
            blanks.append(f"{_shown(uri, path)} row {row}")
        count += int(pc.sum(blank).as_py() or 0)
    if count:
        raise JobError(
            f"input.columns.id {column!r} is null or empty in {count} rows (first: {', '.join(blanks)}). Every row "
            "needs its own id: resume and the audit match rows by it. Try filling them in, or another "
            "input.columns.id."
        )
    ids = pa.concat_arrays(chunks) if len(chunks) > 1 else chunks[0]
    _refuse_repeated(ids, column)
    return ids


def _refuse_repeated(ids: pa.Array, column: str) -> None:
    counts = pc.value_counts(ids)
    repeated = counts.filter(pc.greater(counts.field("counts"), 1))
    if not len(repeated):
        return
    shown = ", ".join(f"{r['values']!r} x{r['counts']}" for r in repeated.to_pylist()[:_SHOWN])
    more = f" and {len(repeated) - _SHOWN} more" if len(repeated) > _SHOWN else ""
    raise JobError(
        f"input.columns.id {column!r} is not unique; repeated ids: {shown}{more}. Resume and the audit match "
        "rows by id. Try de-duplicating the input, or a unique column as input.columns.id."
    )


def check_output(config: JobConfig) -> None:
    out, inp = config.output.path.rstrip("/"), config.input.path.rstrip("/")
    if out == inp or out.startswith(inp + "/"):
        raise JobError(
            f"output.path {config.output.path} is inside input.path {config.input.path}: the next run would read "
            "its part files as input. Try an output directory outside the input."
        )
    check_output_mode(config.output)
