"""``jobs.run --dry-run``: what a run would do, without an engine, a GPU or Ray.

    report = dry_run(config, plan)

Runs the CPU stage (``actors.preprocess.PreprocessRows``) on this machine's cores (``workers`` processes;
by default all of them once the input has more than a few batches per core) over every row the run would
process (resume's done rows and a --limit applied as the run applies them), and reports the rows by
status and error code, the prompt tokens by modality, and an estimated GPU time: prompt tokens plus at
most each row's max_tokens, at a tokens-per-second rate. The default rate comes from the committed H200
benchmark (``bench/results/gpu-cuda-h200.json``, the pipeline's steady state: ``default_rate``). Nothing
is written and the output's lock is not taken.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path

import pyarrow as pa

from pipelines.cpu_pool import prepare_in_processes, usable_cores
from pipelines.output.commit import committed_ids
from pipelines.output.retry import retry_of, without
from pipelines.validate import JobPlan
from schemas.job import JobConfig, pool_bounds
from schemas.redact import redact
from schemas.rows import ErrorCode, Status

BENCHMARK = Path(__file__).resolve().parents[1] / "bench" / "results" / "gpu-cuda-h200.json"
MODALITIES = ("text", "image", "audio", "image_audio")
EXAMPLES = 3  # error rows shown per code: ids and messages, so a count says what went wrong


def default_rate(path: Path = BENCHMARK) -> tuple[float, str] | None:
    """Tokens per second of one GPU engine, prompt and completion together, in the pipeline's steady
    state on the committed benchmark run, and where that figure comes from; None without the file."""
    try:
        result = json.loads(path.read_text())
        figures = result["figures"]
        tokens = figures["pipeline.prompt_tokens"] + figures["pipeline.completion_tokens"]
        rate = figures["pipeline.steady.rows_per_s"] * tokens / figures["pipeline.rows"]
    except (OSError, KeyError, TypeError, ValueError, ZeroDivisionError):
        return None
    device = str(result.get("device", "GPU")).split(" (")[0].split(": ")[-1]
    return rate, f"{path.name}: {device}, pipeline steady state"


def _modality(num_images: int, num_audios: int) -> str:
    return MODALITIES[(1 if num_images else 0) + (2 if num_audios else 0)]


def _batches(config: JobConfig, plan: JobPlan, done_ids: pa.Array):
    """The rows the run would process, in input order, in CPU-stage batches."""
    from pipelines.phi4mm import _select_rows

    size = config.resources.preprocess.batch_size
    for path in plan.files:
        for table in plan.input_ids.tables(path, size):  # with derived ids, their column added
            table = _select_rows(
                table, config.input.columns.id, done_ids, plan.run_ids, plan.schema
            )  # a --limit run: its ids, minus those done (_select_rows drops done ids itself)
            if table.num_rows:
                yield table


# What the report counts of each prepared row.
COUNTED = [
    "id",
    "status",
    "error_message",
    "error_code",
    "num_images",
    "num_audios",
    "prompt_tokens",
    "max_tokens",
    "audio_chunks",
    "tasks",
]


def default_workers(plan: JobPlan, batch_size: int) -> int:
    """All usable cores once there are at least four batches per core; fewer (one for a small input)
    below, where starting processes (each loads the tokenizer) would cost more than it saves."""
    return max(1, min(usable_cores(), plan.input_rows // (4 * batch_size)))


def dry_run(
    config: JobConfig, plan: JobPlan, tokens_per_s: float | None = None, workers: int | None = None
) -> dict:
    """The dry run's report (see the module doc); ``tokens_per_s`` overrides the benchmark's rate,
    ``workers`` the number of CPU-stage processes (default ``default_workers``)."""
    from actors.multitask import completion_budget

    started = time.perf_counter()
    done = committed_ids(config.output.path) if config.output.mode == "resume" else pa.array([], pa.string())
    if retry := retry_of(config.output, done, plan.run_ids if plan.run_ids is not None else plan.input_ids):
        done = without(done, retry.ids)  # error rows --retry-errors runs again
    workers = workers or default_workers(plan, config.resources.preprocess.batch_size)
    status, codes = Counter(), Counter()
    examples: dict[str, list[dict]] = {}
    rows_by, tokens_by = Counter(), Counter()
    completion = 0
    prepared = prepare_in_processes(config, _batches(config, plan, done), workers, COUNTED)
    for row in (row for table in prepared for row in table.to_pylist()):
        if config.tasks and row["status"] == Status.OK.value and not completion_budget(row, config):
            # no task can run on the row (each has its own error): the run writes it as TASKS_FAILED
            row.update(status=Status.ERROR.value, error_code=ErrorCode.TASKS_FAILED.value)
        status[row["status"]] += 1
        if row["status"] != Status.OK.value:
            codes[row["error_code"]] += 1
            shown = examples.setdefault(row["error_code"], [])
            if len(shown) < EXAMPLES:
                shown.append({"id": row["id"], "message": row["error_message"]})
            continue
        modality = _modality(row["num_images"], row["num_audios"])
        rows_by[modality] += 1
        tokens_by[modality] += row["prompt_tokens"]
        if config.tasks:  # each runnable task's budget, once per sample
            completion += completion_budget(row, config)
        else:
            completion += config.max_tokens(row["max_tokens"]) * (row["audio_chunks"] or 1)
    rate, source = (tokens_per_s, "--tokens-per-s") if tokens_per_s else (default_rate() or (None, None))
    total = sum(tokens_by.values()) + completion
    engines = pool_bounds(config.resources.generate.concurrency)[1]
    return {
        "input": redact(config.input.path),
        "output": redact(config.output.path),
        "rows": sum(status.values()),
        "rows_skipped_already_done": len(done),
        "status": dict(status),
        "error_codes": dict(sorted(codes.items())),
        "error_examples": {code: examples[code] for code in sorted(examples)},
        "ok_rows_by_modality": {m: rows_by[m] for m in MODALITIES if rows_by[m]},
        "prompt_tokens_by_modality": {m: tokens_by[m] for m in MODALITIES if rows_by[m]},
        "completion_tokens_at_most": completion,
        "tokens_per_s_per_gpu": round(rate, 1) if rate else None,
        "rate_source": source,
        "gpu_s": round(total / rate, 1) if rate else None,
        "gpu_actors": engines,
        "wall_s_at_gpu_actors": round(total / rate / engines, 1) if rate else None,
        "dry_run_s": round(time.perf_counter() - started, 2),
        "dry_run_workers": workers,
    }


def format_dry_run(report: dict) -> str:
    status = report["status"]
    lines = [
        "",
        "phi4mm-batch dry run (no engine; nothing written)",
        f"  input            {report['input']}",
        f"  rows             {report['rows']}  (ok {status.get('ok', 0)}, error {status.get('error', 0)})",
    ]
    if report["rows_skipped_already_done"]:
        lines.append(
            f"  rows skipped     {report['rows_skipped_already_done']} already in the output (resume)"
        )
    for code, n in report["error_codes"].items():
        lines.append(f"    {code:<28} {n}")
        lines += [
            f"      id {e['id']}: {e['message']}" for e in report.get("error_examples", {}).get(code, [])
        ]
    lines.append("  prompt tokens by modality (ok rows)")
    for modality, tokens in report["prompt_tokens_by_modality"].items():
        rows = report["ok_rows_by_modality"][modality]
        lines.append(f"    {modality:<12} {rows:>8} rows {tokens:>12} tokens ({tokens / rows:.0f} per row)")
    lines.append(
        f"  completion       at most {report['completion_tokens_at_most']} tokens (max_tokens per row)"
    )
    if report["gpu_s"] is None:
        lines.append("  GPU time         unknown: no benchmark figures. Try --tokens-per-s RATE.")
    else:
        lines.append(
            f"  GPU time         about {report['gpu_s']:.0f} GPU-s at {report['tokens_per_s_per_gpu']:.0f} tokens/s "
            f"per GPU ({report['rate_source']}); {report['wall_s_at_gpu_actors']:.0f} s on "
            f"{report['gpu_actors']} GPU actor(s), plus engine start"
        )
    return "\n".join(lines)
