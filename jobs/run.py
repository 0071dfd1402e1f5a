"""Entrypoint: run a phi4mm-batch job.

    python -m jobs.run --config FILE.yaml [--input PATH] [--output PATH] [--model PATH] [--limit N]

Without a cluster it starts a local Ray; under ``ray job submit --working-dir . -- python -m jobs.run …``
(or with RAY_ADDRESS set) it joins that cluster. Prints a summary and writes it beside the output as
``_run-<run_id>.json``. Exit status: 0 when every input row has exactly one output row (error rows
included), 1 when the audit finds rows missing or duplicated, 2 for a config error.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
import uuid
from pathlib import Path

from pydantic import ValidationError

from schemas.job import JobConfig

logger = logging.getLogger("phi4mm_batch")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m jobs.run", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="Job config YAML (see jobs/configs/).")
    parser.add_argument("--input", help="Override input.path.")
    parser.add_argument("--output", help="Override output.path.")
    parser.add_argument("--model", help="Override model.path.")
    parser.add_argument("--limit", type=int, help="Process only the first N rows.")
    parser.add_argument("--mode", choices=["resume", "overwrite", "error"], help="Override output.mode.")
    parser.add_argument("--run-id", help="Id for this run (default: time + random suffix).")
    return parser.parse_args(argv)


def load_config(args: argparse.Namespace) -> JobConfig:
    def local(p: str) -> str:  # CLI paths are relative to the current directory, not the YAML's
        return p if "://" in p else str(Path(p).resolve())

    overrides = {}
    for key, value in (("input.path", args.input), ("output.path", args.output), ("model.path", args.model)):
        if value:
            overrides[key] = local(value)
    if args.limit:
        overrides["input.limit"] = args.limit
    if args.mode:
        overrides["output.mode"] = args.mode
    return JobConfig.from_yaml(args.config, overrides)


def init_ray() -> None:
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(log_to_driver=True)  # a submitted job: join the cluster that runs it
    else:
        ray.init(include_dashboard=False, log_to_driver=True)
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = sys.stderr.isatty()


def format_summary(summary: dict) -> str:
    status = summary["status"]
    lines = [
        "",
        f"phi4mm-batch run {summary['run_id']}",
        f"  model            {summary['model']}",
        f"  input            {summary['input']}",
        f"  output           {summary['output']}",
        f"  rows written     {summary['rows_written']}  (ok {status.get('ok', 0)}, error {status.get('error', 0)})",
    ]
    if summary["rows_skipped_already_done"]:
        lines.append(
            f"  rows skipped     {summary['rows_skipped_already_done']} already in the output (resume)"
        )
    for code, n in summary["error_codes"].items():
        lines.append(f"    {code:<28} {n}")
    for actor, engine in summary.get("engines", {}).items():
        lines.append(
            f"  engine {actor:<20} start {engine['startup_s']} s, {engine['requests']} requests, "
            f"busy {engine['busy_s']} s, up to {engine['max_in_flight']} in flight"
        )
    cpu = summary.get("cpu_actors", {})
    if cpu:
        rows = sorted(s["rows"] for s in cpu.values())
        lines.append(f"  cpu actors       {len(cpu)} worked, rows per actor {rows[0]}..{rows[-1]}")
    audit = summary["audit"]
    verdict = "ok" if audit["ok"] else "FAILED"
    lines += [
        f"  tokens           prompt {summary['prompt_tokens']}, completion {summary['completion_tokens']}",
        f"  time             {summary['wall_s']:.1f} s, {summary['rows_per_s']} rows/s",
        f"  audit            {verdict}: {audit['input_rows']} input rows, {audit['output_rows']} output rows, "
        f"{audit['missing_ids']} missing, {audit['duplicate_ids']} duplicated",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    try:
        config = load_config(args)
    except (ValidationError, ValueError, FileNotFoundError) as e:
        print(f"config error in {args.config}:\n{e}", file=sys.stderr)
        return 2
    run_id = args.run_id or time.strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:6]
    init_ray()
    from pipelines import run_pipeline

    summary = run_pipeline(config, run_id)
    print(format_summary(summary))
    print("SUMMARY_JSON " + json.dumps(summary, default=str))
    return 0 if summary["audit"]["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
