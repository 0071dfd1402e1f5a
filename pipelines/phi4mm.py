"""The Phi-4-multimodal batch pipeline: read Parquet -> CPU stage -> GPU stage -> committed Parquet.

    summary = run_pipeline(config, run_id)

Stages are the plain classes in ``actors``; this module only decides how Ray schedules them.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from pipelines.incremental import done_among, file_segments, input_files_record, pending_files
from pipelines.output.audit import Audit, audit, audit_ids
from pipelines.output.commit import commit_run, write_manifest
from pipelines.output.ids import IdColumn, count_in, id_strings
from pipelines.output.layout import staging_name
from pipelines.output.lock import OutputLock
from pipelines.output.parts import WriteStats
from pipelines.output.prepare import prepare_output
from pipelines.output.retry import RetryPlan, commit_retry, parts_after, retry_of, stage_kept_rows, without
from pipelines.progress import ProgressMonitor
from pipelines.progress_plot import progress_png
from pipelines.provenance import provenance
from pipelines.spec import StageSpec, apply
from pipelines.validate import (
    JobPlan,
    check_input_columns,
    input_files,
    input_schema,
    validate_job,
    with_id_column,
)
from schemas.job import JobConfig, pool_bounds
from schemas.output import OutputShape, TypedColumn
from schemas.redact import redact
from schemas.storage import filesystem_for, use

logger = logging.getLogger(__name__)


def build_stages(config: JobConfig, run_id: str, ledger=None) -> list[StageSpec]:
    from actors.generate import GenerateRows
    from actors.preprocess import PreprocessRows

    engine_env = {**compile_cache_env(config.engine.compile_cache_dir), **config.engine.env}
    if config.engine.executor == "uni":
        # Keeps the engine core in the actor's own process: starts ~3x faster, one process to restart.
        engine_env.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    return [
        StageSpec(
            fn=PreprocessRows,
            fn_constructor_kwargs={"config": config, "ledger": ledger},
            resources=config.resources.preprocess,
        ),
        StageSpec(
            fn=GenerateRows,
            fn_constructor_kwargs={"config": config, "run_id": run_id, "ledger": ledger},
            resources=config.resources.generate,
            env=engine_env,
        ),
    ]


def compile_cache_env(cache_dir: str | None) -> dict[str, str]:
    """Point vLLM's torch.compile cache, Triton's and Inductor's kernel caches and FlashInfer's JIT cache
    under one directory: on a path every GPU node mounts, later actors and runs start warm."""
    if not cache_dir:
        return {}
    return {
        "VLLM_CACHE_ROOT": f"{cache_dir}/vllm",
        "TRITON_CACHE_DIR": f"{cache_dir}/triton",
        "TORCHINDUCTOR_CACHE_DIR": f"{cache_dir}/inductor",
        "FLASHINFER_WORKSPACE_BASE": f"{cache_dir}/flashinfer",
    }


def warn_if_resources_short(config: JobConfig) -> None:
    """Actor pools hold their CPUs for the whole run: if they leave none for read/write tasks the job
    stalls without an error, so say so up front."""
    import ray

    res = config.resources
    # Ray Data's file-listing task asks for a whole CPU, whatever io_num_cpus says.
    io = max(1.0, res.io_num_cpus)
    needed = (
        pool_bounds(res.preprocess.concurrency)[0] * res.preprocess.num_cpus
        + pool_bounds(res.generate.concurrency)[0] * res.generate.num_cpus
        + io
    )
    available = ray.cluster_resources().get("CPU", 0)
    if available < needed:
        logger.warning(
            "the cluster has %.1f CPUs but the actor pools plus one file-listing/read task need %.1f: unless the "
            "cluster autoscales, the job will stall. Try lowering resources.*.num_cpus or resources.io_num_cpus.",
            available,
            needed,
        )


def conform(batch: pa.Table, schema: pa.Schema) -> pa.Table:
    """``batch`` in the input's schema as validation merged it from every file: a column its file lacks is
    null, a narrower type is widened. Ray reads with the first file's schema of each execution, which
    differs from segment to segment (a type Arrow cannot cast is left as it is)."""
    columns = []
    for f in schema:
        if f.name not in batch.column_names:
            columns.append(pa.nulls(batch.num_rows, f.type))
            continue
        column = batch.column(f.name)
        try:
            columns.append(column if column.type == f.type else column.cast(f.type))
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError):
            columns.append(column)
    return pa.Table.from_arrays(columns, names=schema.names)


def _select_rows(
    batch: pa.Table, id_column: str, done_ids: pa.Array, keep_ids: pa.Array | None, schema: pa.Schema | None
) -> pa.Table:
    """The input's merged ``schema`` when given; ids in their one string form (so the output, resume and
    the audit agree whatever the input's id type), minus rows already done, and only ``keep_ids`` when
    given."""
    if schema is not None:
        batch = conform(batch, schema)
    ids = id_strings(batch.column(id_column))
    batch = batch.set_column(batch.schema.get_field_index(id_column), id_column, ids)
    keep = pc.invert(pc.fill_null(pc.is_in(ids, value_set=done_ids), False))
    if keep_ids is not None:
        keep = pc.and_(keep, pc.fill_null(pc.is_in(ids, value_set=keep_ids), False))
    return batch.filter(keep)


def read_input(
    config: JobConfig,
    done_ids: pa.Array,
    keep_ids: pa.Array | None = None,
    files: list[str] | None = None,
    schema: pa.Schema | None = None,
):
    """The input rows still to do, as a lazy Ray dataset in blocks of one CPU batch each.

    ``keep_ids``: run only these rows (a --limit run: its first N ids, as validation listed them, so which
    rows run does not depend on the order Ray's read tasks finish in). ``files``: read only these input
    files (``pipelines.incremental.pending_files``; default: all of input.path). ``schema``: the input's
    schema as validation merged and checked it (every block is given it); without it, the columns are
    checked here against what Ray reads."""
    import ray

    fs, path = filesystem_for(config.input.path, config.storage)  # the job's endpoint, not the default
    select = {"id_column": config.input.columns.id, "done_ids": done_ids, "keep_ids": keep_ids}
    if config.input.derived_ids:
        ds = _read_with_derived_ids(config, fs, path, files, schema, select)
    else:
        ds = ray.data.read_parquet(files or path, filesystem=fs, num_cpus=config.resources.io_num_cpus)
        if schema is None:
            check_input_columns(config, ds.schema().base_schema)
        ds = ds.map_batches(_select_rows, batch_format="pyarrow", fn_kwargs={**select, "schema": schema})
    if keep_ids is not None:
        ds = ds.limit(len(keep_ids))  # all there is: lets Ray stop reading once they have passed
    # Ray hands a whole block to one actor: a single-row-group file would keep one CPU actor busy while
    # the rest idled. Blocks of one CPU batch keep every actor of the pool fed whatever the files, row
    # groups and block sizes are; tiny blocks from many small files are combined up to that size.
    # Streaming: nothing is materialised.
    return ds.repartition(target_num_rows_per_block=config.resources.preprocess.batch_size)


def _read_with_derived_ids(config: JobConfig, fs, root: str, files, schema, select: dict):
    """``input.derived_ids``: each row's id is made from its file and its row in that file
    (``pipelines.output.ids``), so a read task must see a whole file in order. Ray's read_parquet tells neither
    (``include_paths`` gives the file, but no row in it; ``include_row_hash`` hashes the absolute path and
    the row's position after filters), so each file is read by a task of its own, in file order, in
    batches of one CPU batch (a generator: a large file is never held whole)."""
    import ray

    files = files or input_files(config.input.path)[1]
    if schema is None:
        schema = input_schema(fs, files, config.input.path)[0]
        check_input_columns(config, schema)
        schema = with_id_column(config, schema)
    ids = IdColumn(fs, (), config.input.columns.id, config.input.path, 0, root)
    ds = ray.data.from_items([{"file": f} for f in files], override_num_blocks=len(files))
    return ds.map_batches(
        _read_files,
        batch_size=1,
        batch_format="pyarrow",
        num_cpus=config.resources.io_num_cpus,
        fn_kwargs={
            **select,
            "ids": ids,
            "batch_size": config.resources.preprocess.batch_size,
            "schema": schema,
        },
    )


def _read_files(files: pa.Table, ids: IdColumn, batch_size: int, **select) -> Iterator[pa.Table]:
    """A read task: each file's rows with their derived ids, selected as ``_select_rows`` does."""
    for path in files.column("file").to_pylist():
        for table in ids.tables(path, batch_size):
            yield _select_rows(table, **select)


def output_shape(config: JobConfig, plan: JobPlan) -> OutputShape:
    """The output's layout: renames, carried input columns with their datasets features."""
    cols = config.input.columns
    media = {name: kind for name, kind in ((cols.image, "Image"), (cols.audio, "Audio")) if name}
    asked = config.structured
    typed = None
    if asked and asked.json_schema is not None and asked.typed_column:
        typed = TypedColumn(asked.typed_column, json.dumps(asked.json_schema))
    return OutputShape.of(
        config.output.column_names,
        config.output.carry_columns,
        plan.schema,
        media,
        typed,
        tuple(config.tasks or ()),
    )


def parts_summary(names: list[str], shown: int = 3) -> dict[str, Any]:
    """The run's committed parts as the summary gives them: how many, the first and last few names (the
    run's commit marker ``_committed-<run>.json`` names them all)."""
    names = sorted(names)
    if len(names) <= 2 * shown:
        return {"count": len(names), "first": names, "last": []}
    return {"count": len(names), "first": names[:shown], "last": names[-shown:]}


@dataclass(frozen=True)
class Work:
    """What a run has to do, decided holding the output's lock and before Ray starts (``prepare_work``)."""

    skip_ids: pa.Array  # ids not to run: those in the output, less the rows a retry runs again
    keep_ids: pa.Array | None  # a --limit run: its ids still to do (None: every input id not skipped)
    skipped: int  # input rows of this run found done
    files: list[str]  # the input files to read
    retry: RetryPlan | None  # error rows run again (output.retry_errors); None: none found
    pending: int  # rows to run (retried ones included)
    overwrite: bool

    @property
    def idle(self) -> bool:
        """Nothing to run and nothing to replace: no Ray, no engine, no commit."""
        return not self.pending and not self.overwrite


def prepare_work(config: JobConfig, plan: JobPlan) -> Work:
    """Make the output ready (``prepare_output``: needs the output's lock) and decide what the run does:
    which ids it skips (resume), which error rows it runs again (``pipelines.output.retry``), which files it
    reads. Needs no Ray: ``jobs.run`` asks before it starts one, so a run with nothing to do starts none."""
    out = config.output
    done_ids = prepare_output(out)
    retry = retry_of(out, done_ids, plan.run_ids if plan.run_ids is not None else plan.input_ids)
    skip_ids = without(done_ids, retry.ids) if retry else done_ids
    # Input rows of this run found done, not output rows: those may include rows outside a --limit.
    # Without a limit the input's ids are streamed again (batch by batch), not held.
    # (skip_ids itself is the output's ids in memory: resume's skip set goes to Ray's tasks as it is.)
    keep_ids = None
    if plan.run_ids is not None:  # a --limit run: its few ids are in the plan
        skipped = count_in([("", 0, plan.run_ids)], skip_ids)
        keep_ids = plan.run_ids.filter(pc.invert(pc.is_in(plan.run_ids, value_set=skip_ids)))
    else:
        skipped = count_in(plan.input_ids.batches(), skip_ids)
    # Files whose every row is in the output already are not read at all (an input directory that keeps
    # receiving files: each run reads the new ones and any a killed run left unfinished).
    files = pending_files(plan.input_ids, skip_ids) if keep_ids is None else list(plan.files)
    pending = len(keep_ids) if keep_ids is not None else plan.input_rows - skipped
    return Work(skip_ids, keep_ids, skipped, files, retry, pending, out.mode == "overwrite")


def run_pipeline(
    config: JobConfig,
    run_id: str,
    plan: JobPlan | None = None,
    lock: OutputLock | None = None,
    work: Work | None = None,
    argv: list[str] | None = None,
) -> dict[str, Any]:
    """Run the job on the current Ray cluster and return its summary (also written beside the output).

    Validates the job first (``pipelines.validate``; a JobError leaves everything as it was) unless given
    its ``plan``, and holds the output's lock for the whole run unless the caller holds it (``lock``):
    ``jobs.run`` does both before it starts Ray, so a mistake or a busy output costs no cluster start.
    ``work``: what ``prepare_work`` decided, holding that lock; ``argv``: the command's arguments, for the
    manifest (``jobs.run``'s; None: this process's). A run with nothing to do (every row done,
    no error row to retry) uses no Ray: it audits the output and writes its summary."""
    started = time.perf_counter()
    use(config.storage)
    plan = plan or validate_job(config, run_id)
    if lock is not None:
        return _run_locked(config, run_id, plan, started, work, argv)
    with OutputLock(config.output.path, run_id):
        return _run_locked(config, run_id, plan, started, work, argv)


def _run_locked(
    config: JobConfig, run_id: str, plan: JobPlan, started: float, work: Work | None, argv: list[str] | None
) -> dict[str, Any]:
    out = config.output
    work = work or prepare_work(config, plan)
    if work.skipped:
        logger.info(
            "resume: %s already holds %d rows of this run; their ids are skipped", out.path, work.skipped
        )
    if work.retry:
        logger.info(
            "retry: %d error rows (%s) run again; their new rows replace them", work.retry.rows,
            ", ".join(work.retry.codes),
        )  # fmt: skip
    if work.idle:
        logger.info("nothing to do: every row of this run is in %s; no Ray, no engine", out.path)
        check = audit(plan.input_ids, out.path, plan.run_ids)
        return _finish(config, run_id, plan, work, WriteStats(), check, True, started, {}, None, {}, argv)
    from pipelines.placement import check_placement

    check_placement(config)  # a stage no node can host would wait forever: exit 2 before anything is read
    warn_if_resources_short(config)
    # Segments of the input, each its own Ray Data execution (the driver keeps per-block stats for a whole
    # execution); a --limit run is small: one.
    segments = (
        [work.files]
        if work.keep_ids is not None
        else file_segments(plan.input_ids, work.files, config.resources.segment_rows)
    )
    from pipelines.ledger import RayAttemptLedger

    ledger = RayAttemptLedger(run_id).create()  # outlives GPU actors that crash

    def executions():  # built one at a time: the next once the writer has taken the last block of this one
        for group in segments:
            group = group or list(plan.files[:1])  # nothing left to do: one file read, its rows all skipped
            # each read task gets its skip set: the segment's own done ids (a --limit run's keep_ids
            # already leave done rows out)
            skip = (
                done_among(plan.input_ids, group, work.skip_ids)
                if work.keep_ids is None
                else work.skip_ids[:0]
            )
            ds = read_input(config, skip, work.keep_ids, files=group, schema=plan.schema)
            yield apply(ds, build_stages(config, run_id, ledger))

    monitor = ProgressMonitor(
        lambda: ledger.actor_stats().get("progress", {}),
        work.pending,
        every_s=config.progress.every_s,
        log=not sys.stderr.isatty(),  # a terminal has Ray Data's progress bars
        engines=lambda: ledger.actor_stats().get("generate", {}),
    ).start()
    from pipelines.output.writer import write_stream

    # Parts of commit_every_rows rows (or commit_every_s seconds of rows) whatever the blocks' sizes:
    # the writer actor buffers rows across blocks (pipelines.output.writer). An overwrite, and a retry (whose
    # new rows replace old ones), stage theirs until they commit.
    into = staging_name(run_id) if out.mode == "overwrite" or work.retry else None
    try:
        stats = write_stream(
            executions(), out, run_id, into=into, lock_run_id=run_id, storage=config.storage,
            shape=output_shape(config, plan),
        )  # fmt: skip
        monitor.stop()  # its last sample: the final counts
        actors = ledger.actor_stats()
        deaths = ledger.engine_deaths()
    finally:
        monitor.stop()
        ledger.close()
    # An overwrite is audited where it was staged and swapped in only when whole, a retry as its commit
    # would leave the output: otherwise the old output stays as it was (and the staged parts are removed
    # by the next run). The audit streams the input's and the output's ids into hash buckets: bounded
    # memory whatever the row count.
    if work.retry:
        staged = stats.files + stage_kept_rows(out.path, run_id, work.retry)
        check = audit_ids(plan.input_ids, parts_after(out.path, run_id, work.retry, staged), plan.run_ids)
        if check.ok:
            commit_retry(out.path, run_id, staged, work.retry)
    else:
        check = audit(
            plan.input_ids, f"{out.path.rstrip('/')}/{into}" if into else out.path, plan.run_ids, stats.files
        )
        if check.ok or out.mode != "overwrite":
            commit_run(out.path, run_id, out.mode, stats.files)
    committed = check.ok or not into
    if not committed:
        logger.error("%s not committed: its audit failed; the old output is unchanged", out.path)
    return _finish(
        config, run_id, plan, work, stats, check, committed, started, actors, monitor, deaths, argv
    )


def _finish(
    config: JobConfig,
    run_id: str,
    plan: JobPlan,
    work: Work,
    stats: WriteStats,
    check: Audit,
    committed: bool,
    started: float,
    actors: dict,
    monitor: ProgressMonitor | None,
    deaths: dict[str, int],
    argv: list[str] | None = None,
) -> dict[str, Any]:
    """The run's summary, written beside the output with its rate plot (``monitor``'s samples; none for
    a run with nothing to do); returned."""
    out = config.output
    wall_s = time.perf_counter() - started
    summary = {
        "run_id": run_id,
        "input": redact(config.input.path),
        "output": redact(out.path),
        "model": config.model_name,
        "mode": out.mode,
        "committed": committed,
        "rows_written": stats.rows,
        "rows_skipped_already_done": work.skipped,
        "rows_retried": work.retry.rows if work.retry else 0,
        "nothing_to_do": work.idle,
        "status": dict(stats.status),
        "error_codes": dict(sorted(stats.error_codes.items())),
        "finish_reasons": dict(sorted(stats.finish_reasons.items())),
        "tasks": {name: dict(sorted(counts.items())) for name, counts in sorted(stats.tasks.items())},
        "prompt_tokens": stats.prompt_tokens,
        "completion_tokens": stats.completion_tokens,
        "wall_s": round(wall_s, 2),
        "rows_per_s": round(stats.rows / wall_s, 3) if wall_s else None,
        "parts": parts_summary(stats.files),
        # an actor whose engine never came up reported only when it began starting: not an engine
        "engines": {k: v for k, v in actors.get("generate", {}).items() if "starting_since" not in v},
        "engine_deaths": deaths,
        "cpu_actors": actors.get("preprocess", {}),
        "audit": {**check.__dict__, "ok": check.ok},
        "input_files": input_files_record(plan.input_ids, work.files),
        "provenance": provenance(config, actors.get("device", {}), plan.adapters, argv),
    }
    plot = None
    if config.progress.plot and monitor is not None:
        ups = sorted(
            e["ready_at"] - monitor.started_wall for e in summary["engines"].values() if "ready_at" in e
        )
        plot = progress_png(
            monitor.samples,
            f"phi4mm-batch run {run_id}: {stats.rows} rows in {wall_s:.0f} s",
            marks=[(t, "engine up") for t in ups if t > 0],
        )
        summary["progress_plot"] = f"_run-{run_id}.png"
    write_manifest(out.path, run_id, summary, plot)
    return summary
