"""The Phi-4-multimodal batch pipeline: read Parquet -> CPU stage -> GPU stage -> committed Parquet.

    summary = run_pipeline(config, run_id)

Stages are the plain classes in ``actors``; this module only decides how Ray schedules them.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from pipelines.io import audit, prepare_output, write_manifest
from pipelines.spec import StageSpec, apply
from schemas.job import JobConfig, pool_bounds

logger = logging.getLogger(__name__)


def build_stages(config: JobConfig, run_id: str, ledger=None) -> list[StageSpec]:
    from actors.generate import GenerateRows
    from actors.preprocess import PreprocessRows

    pre, gen = config.resources.preprocess, config.resources.generate
    engine_env = {**compile_cache_env(config.engine.compile_cache_dir), **config.engine.env}
    if config.engine.executor == "uni":
        # Keeps the engine core in the actor's own process: starts ~3x faster, one process to restart.
        engine_env.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    return [
        StageSpec(
            fn=PreprocessRows,
            fn_constructor_kwargs={"config": config, "ledger": ledger},
            concurrency=pre.concurrency,
            batch_size=pre.batch_size,
            num_cpus=pre.num_cpus,
            num_gpus=pre.num_gpus,
            concurrent_batches=pre.concurrent_batches,
            max_restarts=pre.max_restarts,
        ),
        StageSpec(
            fn=GenerateRows,
            fn_constructor_kwargs={"config": config, "run_id": run_id, "ledger": ledger},
            concurrency=gen.concurrency,
            batch_size=gen.batch_size,
            num_cpus=gen.num_cpus,
            num_gpus=gen.num_gpus,
            env=engine_env,
            concurrent_batches=gen.concurrent_batches,
            max_restarts=gen.max_restarts,
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


def check_input_columns(config: JobConfig, schema: pa.Schema) -> None:
    """Fail before any actor starts when the configured columns do not match the data."""
    cols = config.input.columns
    names = set(schema.names)
    if cols.id not in names:
        raise ValueError(
            f"input {config.input.path} has no id column {cols.id!r} (columns: {sorted(names)}). "
            "Try passing input.columns.id with the name of a unique key column."
        )
    content = [c for c in (cols.image, cols.audio, cols.prompt) if c]
    if not any(c in names for c in content):
        raise ValueError(
            f"input {config.input.path} has none of the columns {content} (columns: {sorted(names)}). "
            "Try setting input.columns.image / audio / prompt to the names your data uses."
        )
    for c in content:
        if c not in names:
            logger.info("input has no %r column; treating it as empty", c)


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
            "the cluster has %.1f CPUs but the actor pools plus one file-listing/read/write task need %.1f: unless the "
            "cluster autoscales, the job will stall. Try lowering resources.*.num_cpus or resources.io_num_cpus.",
            available,
            needed,
        )


def _drop_done(batch: pa.Table, id_column: str, done_ids: pa.Array) -> pa.Table:
    ids = pc.cast(batch.column(id_column), pa.string())
    return batch.filter(pc.invert(pc.fill_null(pc.is_in(ids, value_set=done_ids), False)))


def _input_ids(config: JobConfig) -> pa.Array | None:
    """All input ids, for the audit; None for --limit runs, where which rows ran is Ray's choice."""
    if config.input.limit:
        return None
    import pyarrow.dataset as pads

    dataset = pads.dataset(config.input.path, format="parquet")
    return pc.cast(dataset.to_table(columns=[config.input.columns.id]).column(0), pa.string())


def read_input(config: JobConfig, done_ids: pa.Array):
    """The input rows still to do, as a lazy Ray dataset in blocks of one CPU batch each."""
    import ray

    ds = ray.data.read_parquet(config.input.path, num_cpus=config.resources.io_num_cpus)
    check_input_columns(config, ds.schema().base_schema)
    if config.input.limit:
        ds = ds.limit(config.input.limit)
    if len(done_ids):
        logger.info("resume: %d rows already in %s are skipped", len(done_ids), config.output.path)
        ds = ds.map_batches(
            _drop_done,
            batch_format="pyarrow",
            fn_kwargs={"id_column": config.input.columns.id, "done_ids": done_ids},
        )
    # Ray hands a whole block to one actor: a single-row-group file would keep one CPU actor busy while
    # the rest idled. Blocks of one CPU batch keep every actor of the pool fed whatever the files, row
    # groups and block sizes are; tiny blocks from many small files are combined up to that size.
    # Streaming: nothing is materialised.
    return ds.repartition(target_num_rows_per_block=config.resources.preprocess.batch_size)


def run_pipeline(config: JobConfig, run_id: str) -> dict[str, Any]:
    """Run the job on the current Ray cluster and return its summary (also written beside the output)."""

    started = time.perf_counter()
    done_ids = prepare_output(config.output)
    warn_if_resources_short(config)
    io_args = {"num_cpus": config.resources.io_num_cpus}
    ds = read_input(config, done_ids)
    from pipelines.ledger import RayAttemptLedger

    ledger = RayAttemptLedger(run_id).create()  # outlives GPU actors that crash
    ds = apply(ds, build_stages(config, run_id, ledger))
    from pipelines.sink import CommittingParquetSink

    sink = CommittingParquetSink(config.output.path, run_id, config.output.rows_per_file)
    try:
        ds.write_datasink(sink, ray_remote_args=io_args)
        actors = ledger.actor_stats()
    finally:
        ledger.close()
    wall_s = time.perf_counter() - started
    stats = sink.stats
    check = audit(_input_ids(config), config.output.path)
    summary = {
        "run_id": run_id,
        "input": config.input.path,
        "output": config.output.path,
        "model": config.model_name,
        "rows_written": stats.rows,
        "rows_skipped_already_done": len(done_ids),
        "status": dict(stats.status),
        "error_codes": dict(sorted(stats.error_codes.items())),
        "prompt_tokens": stats.prompt_tokens,
        "completion_tokens": stats.completion_tokens,
        "wall_s": round(wall_s, 2),
        "rows_per_s": round(stats.rows / wall_s, 3) if wall_s else None,
        "files": sorted(stats.files),
        "engines": actors.get("generate", {}),
        "cpu_actors": actors.get("preprocess", {}),
        "audit": {**check.__dict__, "ok": check.ok},
    }
    write_manifest(config.output.path, run_id, summary)
    return summary
