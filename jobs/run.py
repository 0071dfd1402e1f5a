"""Entrypoint: run a phi4mm-batch job.

    python -m jobs.run --config FILE.yaml [--config PROFILE.yaml ...] [--input PATH] [--output PATH]
        [--model PATH] [--limit N] [--mode resume|overwrite|error] [--retry-errors CODE,...] [--run-id ID]
        [--set KEY=VALUE ...] [--dry-run [--tokens-per-s R] [--workers N]]

Without a cluster it starts a local Ray; under ``ray job submit --working-dir . -- python -m jobs.run …``
(or with RAY_ADDRESS set) it joins that cluster. Prints a summary and writes it beside the output as
``_run-<run_id>.json`` (its config, command and commit: ``python -m jobs.from_manifest`` writes the config
back as YAML). Exit status: 0 when every input row has exactly one output row (error rows
included), 1 when the audit finds rows missing, duplicated or unexpected, 2 for a mistake in the job
(config, input, model, output mode, an output that overlaps the input, cannot be written or another run
is writing): one line on stderr, nothing changed, 3 when the run itself failed (a traceback; committed
parts stay, ``--mode resume`` carries on).
Several ``--config`` files merge in order, the later winning key by key (``schemas.job.read_config_files``):
``--config jobs/configs/task_caption.yaml --config jobs/configs/profiles/cpu.yaml`` runs a preset on a CPU.
``--set engine.max_model_len=8192`` overrides any config key (validated like the file); ``--dry-run`` runs
only the CPU stage, in this process, and prints what the run would do (``pipelines.dry_run``).
``--retry-errors CODE,...`` runs the output's error rows of those codes again, each new row replacing the
old one (``pipelines.output.retry``). A run with nothing to do (every row done, no such error row) starts no Ray:
it prints the summary and exits 0 in seconds.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
import time
import typing
import uuid
from itertools import pairwise
from pathlib import Path

import yaml
from pydantic import BaseModel, ValidationError

from actors.engines.vllm.stats import work_line
from pipelines.output.lock import OutputLock
from pipelines.validate import validate_job
from schemas.errors import JobError
from schemas.job import LOCAL_PATH_KEYS, MAX_CONFIG_CHARS, ConfigTooLarge, JobConfig, load_yaml
from schemas.redact import install_log_filter, redact
from schemas.reference import one_type

logger = logging.getLogger("phi4mm_batch")

EXIT_AUDIT_FAILED, EXIT_JOB_ERROR, EXIT_RUN_FAILED = 1, 2, 3


def error_line(message: str) -> str:
    return "phi4mm-batch: error: " + " ".join(redact(message).split())  # one line, no URL's secrets


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line like every other job mistake, not usage + message
        print(error_line(f"{message}. Try {self.prog} --help."), file=sys.stderr)
        sys.exit(EXIT_JOB_ERROR)


def _at_least_one(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:  # --limit 0 used to mean "no limit" and ran everything
        raise argparse.ArgumentTypeError(
            f"must be at least 1, got {value}; leave the option out for its default"
        )
    return value


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = _Parser(prog="python -m jobs.run", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--config",
        required=True,
        action="append",
        metavar="FILE.yaml",
        help="Job config YAML (see jobs/configs/). Repeatable: files merge in order, mappings key by key and the "
        "later file winning, e.g. a preset then jobs/configs/profiles/cpu.yaml to run it on a CPU.",
    )
    parser.add_argument("--input", help="Override input.path.")
    parser.add_argument("--output", help="Override output.path.")
    parser.add_argument("--model", help="Override model.path.")
    parser.add_argument(
        "--limit", type=_at_least_one, help="Process only the first N input rows (N >= 1), in input order."
    )
    parser.add_argument("--mode", choices=["resume", "overwrite", "error"], help="Override output.mode.")
    parser.add_argument(
        "--retry-errors",
        type=_codes,
        metavar="CODE,...",
        help="Run the output's error rows with these error codes again (resume), e.g. MEDIA_FETCH_TIMEOUT,"
        "ENGINE_CRASH_QUARANTINED: each new row replaces the old one. Sets output.retry_errors.",
    )
    parser.add_argument("--run-id", help="Id for this run (default: time + random suffix).")
    parser.add_argument(
        "--set",
        **SET_OPTION,
        help="Override a config key, e.g. engine.max_model_len=8192 or task.preset=caption; VALUE is read as "
        "YAML ({a: 1} or {a:1}, [x, y], null; a text key such as engine.env.X keeps 1 as the text '1'). "
        "Repeatable; validated like the file; after the other options.",
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="No engine, no Ray, nothing written: run the CPU stage over every row the run would process and "
        "print rows by status and error code, prompt tokens by modality and an estimated GPU time.",
    )
    parser.add_argument(
        "--tokens-per-s",
        type=_positive,
        help="--dry-run: tokens per second of one GPU engine (default: the committed H200 benchmark's).",
    )
    parser.add_argument(
        "--workers",
        type=_at_least_one,
        help="--dry-run: processes running the CPU stage (default: this machine's cores once the input has "
        "more than four batches per core, else fewer; 1 runs it in this process).",
    )
    return parser.parse_args(argv)


def _key_value(text: str) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    key = key.strip()
    if not sep or not key or any(not part.isidentifier() for part in key.split(".")):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not KEY=VALUE with a dotted key such as engine.max_model_len=8192"
        )
    try:
        read = load_yaml(_spaced_flow_keys(value)) if value.strip() else ""
        if isinstance(read, (bool, int, float)) and _holds_text(key):
            read = value.strip()  # engine.env.X=1 is the text "1", as typed
        return key, read
    except ConfigTooLarge as e:
        raise argparse.ArgumentTypeError(f"{key}=...: the value {e}") from None
    except yaml.YAMLError as e:
        raise argparse.ArgumentTypeError(
            f"{text!r}: the value is not YAML ({' '.join(str(e).split())})"
        ) from None


# In a YAML flow mapping a colon separates key and value only with a space after it: `{concurrency:1}` is
# the one key "concurrency:1" with no value. On a command line users type it without the space.
_GLUED_KEY = re.compile(r"[A-Za-z_][\w-]*:(?=[^\s/:])")  # not a URL's scheme (s3://) nor "::"


def _spaced_flow_keys(text: str) -> str:
    """``{concurrency:1, batch_size:8}`` as users mean it: a space after the colon of each plain key in a
    flow mapping. Quoted text, values (``{path: s3://b/x}``) and text that is not YAML stay as they are."""
    if "{" not in text or len(text) > MAX_CONFIG_CHARS:
        return text  # nothing to do, or load_yaml refuses it
    try:
        tokens = list(yaml.scan(text, Loader=yaml.SafeLoader))
    except yaml.YAMLError:
        return text  # load_yaml reports it
    flows, cuts = [], []
    for before, token in pairwise(tokens):
        if isinstance(token, (yaml.FlowMappingStartToken, yaml.FlowSequenceStartToken)):
            flows.append(isinstance(token, yaml.FlowMappingStartToken))
        elif isinstance(token, (yaml.FlowMappingEndToken, yaml.FlowSequenceEndToken)):
            flows.pop()
        elif (
            isinstance(token, yaml.ScalarToken)
            and token.plain
            and flows
            and flows[-1]  # in a mapping, where a key stands
            and isinstance(before, (yaml.FlowMappingStartToken, yaml.FlowEntryToken))
            and (glued := _GLUED_KEY.match(token.value))
        ):
            cuts.append(token.start_mark.index + glued.end())
    for cut in reversed(cuts):
        text = f"{text[:cut]} {text[cut:]}"
    return text


def _holds_text(key: str) -> bool:
    """Whether the dotted config key holds text (``engine.env.X``, ``model.name``, ``task.template``)."""
    annotation = JobConfig
    for part in key.split("."):
        annotation = one_type(annotation)
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            if part not in annotation.model_fields:
                return False
            annotation = annotation.model_fields[part].annotation
        elif typing.get_origin(annotation) is dict:
            annotation = typing.get_args(annotation)[1]
        else:
            return False
    return one_type(annotation) is str


# --set KEY=VALUE, repeatable: (KEY, VALUE read as YAML) pairs in args.sets (also jobs.from_manifest's)
SET_OPTION = {"dest": "sets", "action": "append", "default": [], "type": _key_value, "metavar": "KEY=VALUE"}


def _codes(text: str) -> list[str]:
    codes = [c.strip() for c in text.split(",") if c.strip()]
    if not codes:
        raise argparse.ArgumentTypeError(f"{text!r} names no error code, such as MEDIA_FETCH_TIMEOUT")
    return codes


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be more than 0, got {text}")
    return value


def load_config(args: argparse.Namespace, origins: dict[str, str] | None = None) -> JobConfig:
    """The config files merged in order, then the options, then each --set; ``origins`` (when given) is
    filled with the file that set each dotted key."""

    def local(p: str) -> str:  # CLI paths are relative to the current directory, not the YAML's
        return p if "://" in p else str(Path(p).resolve())

    overrides = {}
    for key, value in (("input.path", args.input), ("output.path", args.output), ("model.path", args.model)):
        if value:
            overrides[key] = local(value)
    if args.limit is not None:
        overrides["input.limit"] = args.limit
    if args.mode:
        overrides["output.mode"] = args.mode
    if args.retry_errors:
        overrides["output.retry_errors"] = args.retry_errors
    for key, value in args.sets:  # after the options above: the last word wins
        overrides[key] = local(value) if key in LOCAL_PATH_KEYS and isinstance(value, str) else value
    return JobConfig.from_yaml(args.config, overrides, origins)


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
    if files := summary.get("input_files"):
        done = (
            f" (the other {files['count'] - files['read']} were done)"
            if files["read"] < files["count"]
            else ""
        )
        lines.append(f"  input files      {files['count']} seen, {files['read']} read{done}")
    if summary["rows_skipped_already_done"]:
        lines.append(
            f"  rows skipped     {summary['rows_skipped_already_done']} already in the output (resume)"
        )
    if summary.get("rows_retried"):
        lines.append(
            f"  rows retried     {summary['rows_retried']} error rows run again (each new row replaces the old)"
        )
    if summary.get("nothing_to_do"):
        lines.append("  nothing to do    every row is in the output: no Ray, no engine started")
    for code, n in summary["error_codes"].items():
        lines.append(f"    {code:<28} {n}")
    for name, counts in summary.get("tasks", {}).items():
        lines.append(f"  task {name:<20} " + ", ".join(f"{k} {n}" for k, n in counts.items()))
    if looped := summary.get("finish_reasons", {}).get("repetition"):
        lines.append(
            f"  looped rows      {looped} stopped as loops (finish_reason repetition; see `repetition`)"
        )
    for actor, engine in summary.get("engines", {}).items():
        lines.append(
            f"  engine {actor:<20} start {engine['startup_s']} s, {engine['requests']} requests, "
            f"busy {engine['busy_s']} s, up to {engine['max_in_flight']} in flight"
        )
        if work := engine.get("work"):
            lines.append(f"    work {work_line(work)}")
    deaths = summary.get("engine_deaths", {})
    if any(deaths.values()):
        lines.append(
            f"  engine deaths    {deaths['cluster']} the cluster's (out of memory, node lost or preempted: not "
            f"held against the rows in them), {deaths['suspect']} suspect (held against the rows in them)"
        )
    cpu = summary.get("cpu_actors", {})
    if cpu:
        rows = sorted(s["rows"] for s in cpu.values())
        lines.append(f"  cpu actors       {len(cpu)} worked, rows per actor {rows[0]}..{rows[-1]}")
        timed_out, abandoned, running = (
            sum(s.get(k, 0) for s in cpu.values()) for k in ("timed_out", "abandoned", "abandoned_running")
        )
        if timed_out:
            lines.append(
                f"  row time limit   {timed_out} rows timed out, {abandoned} of them left running in "
                f"abandoned threads ({running} still running at their actor's last batch)"
            )
    audit = summary["audit"]
    verdict = "ok" if audit["ok"] else "FAILED"
    unexpected = audit.get("unexpected_ids", 0)
    lines += [
        f"  tokens           prompt {summary['prompt_tokens']}, completion {summary['completion_tokens']}",
        f"  time             {summary['wall_s']:.1f} s, {summary['rows_per_s']} rows/s",
        f"  audit            {verdict}: {audit['input_rows']} input rows, {audit['output_rows']} output rows, "
        f"{audit['missing_ids']} missing, {audit['duplicate_ids']} duplicated"
        + (f", {unexpected} not in the input" if unexpected else ""),
    ]
    if prov := summary.get("provenance"):
        v = prov["versions"]
        lines.append(
            f"  provenance       config {prov['config_sha256'][:12]}, vLLM {v['vllm']}, Ray {v['ray']}, torch "
            f"{v['torch']}, transformers {v['transformers']}; on {', '.join(prov['devices']) or 'no GPU actor'}"
        )
    if summary.get("progress_plot"):
        lines.append(f"  rates plot       {summary['progress_plot']} beside the output")
    if not summary.get("committed", True):
        lines.append("  output           NOT replaced: the run failed its audit; the old output is unchanged")
    return "\n".join(lines)


SHOWN_FILES = 50  # input files listed in the printed summary; the manifest lists every one


def printed(summary: dict) -> dict:
    """The summary as SUMMARY_JSON prints it: a long list of input files is left to the manifest (an input
    directory of 100,000 files would make a line of megabytes)."""
    files = summary.get("input_files")
    if not files or len(files["files"]) <= SHOWN_FILES:
        return summary
    return {**summary, "input_files": {**files, "files": f"{files['count']} files: see the manifest"}}


def validation_lines(
    error: ValidationError,
    configs: list[str],
    sets: list[tuple[str, object]] = (),
    origins: dict[str, str] | None = None,
) -> list[str]:
    """pydantic's report condensed to one line per field: ``FILE: model.max_lora_rank: ...`` naming the
    last of the ``configs`` that set the field or a section above it (``origins``: dotted key -> file), or
    ``--set KEY=VALUE: ...`` when that override set the field (or a section above it)."""
    lines = []
    for e in error.errors():
        loc = [str(p) for p in e["loc"]]
        where = ".".join(loc)
        given = [
            f"--set {k}={v}" for k, v in sets if f"{where}.".startswith(f"{k}.") or k.startswith(f"{where}.")
        ]
        files = [(origins or {}).get(".".join(loc[:n])) for n in range(len(loc), 0, -1)]
        origin = given[-1] if given else next(filter(None, files), ", ".join(configs))
        message = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden" and ":" in loc[-1]:
            key, _, value = loc[-1].partition(":")
            message = (
                f"unknown key: YAML reads {loc[-1]!r} in a {{...}} mapping as one key, for want of a space after "
                f"the colon. Try {{{key}: {value.strip()}, ...}}"
            )
        elif e["type"] == "extra_forbidden":
            message = "unknown key. Try the keys schemas/job.py describes (a typo?)"
        elif e["type"] == "string_type" and isinstance(e.get("input"), (bool, int, float)):
            read, kind = (
                (str(e["input"]).lower(), "a yes/no")
                if isinstance(e["input"], bool)
                else (e["input"], "a number")
            )
            message = f"is text, and YAML reads {read} as {kind}. Try quoting it: '{read}'"
        elif e["type"] == "missing":
            message = "is required. Try adding it (each field is described in schemas/job.py)"
        elif "Try " not in message:
            given = e.get("input")
            shown = f" (got {given!r})" if isinstance(given, (str, int, float, bool)) or given is None else ""
            message = f"{message}{shown}. Try a value that fits (schemas/job.py describes each field)"
        lines.append(error_line(f"{origin}: {where + ': ' if where else ''}{message}"))
    return lines


def main(argv: list[str] | None = None) -> int:
    # Warnings only until the pre-run checks pass: a job-level mistake is one line on stderr.
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    install_log_filter()  # every line this process logs shows URLs without their secrets
    try:
        args = parse_args(argv)
    except SystemExit as e:  # --help, or a CLI mistake already reported in one line
        return int(e.code or 0)
    run_id = args.run_id or time.strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:6]
    # Every job-level check runs before Ray starts and before the output is touched: a mistake costs a
    # second and changes nothing.
    origins: dict[str, str] = {}
    try:
        config = load_config(args, origins)
        plan = validate_job(config, run_id, writes=not args.dry_run)
        lock = None if args.dry_run else OutputLock(config.output.path, run_id).acquire()
    except JobError as e:
        print(error_line(str(e)), file=sys.stderr)
        return EXIT_JOB_ERROR
    except ValidationError as e:
        print("\n".join(validation_lines(e, args.config, args.sets, origins)), file=sys.stderr)
        return EXIT_JOB_ERROR
    logging.getLogger().setLevel(logging.INFO)
    if args.dry_run:  # no lock, no Ray, nothing written
        from pipelines.dry_run import dry_run, format_dry_run

        report = dry_run(config, plan, args.tokens_per_s, args.workers)
        print(format_dry_run(report))
        print("DRY_RUN_JSON " + json.dumps(report))
        return 0
    try:
        from pipelines.phi4mm import prepare_work, run_pipeline

        work = prepare_work(config, plan)  # holding the lock: what is done, what to retry, what to read
        if not work.idle:  # a run with nothing to do starts no Ray and no engine
            init_ray()
        argv = sys.argv[1:] if argv is None else argv  # for the manifest
        summary = run_pipeline(config, run_id, plan=plan, lock=lock, work=work, argv=argv)
    except JobError as e:
        print(error_line(str(e)), file=sys.stderr)
        return EXIT_JOB_ERROR
    except Exception:
        logger.exception(
            "run %s failed. Parts it committed stay in %s; try the same command with --mode resume to carry on.",
            run_id,
            config.output.path,
        )
        return EXIT_RUN_FAILED
    finally:
        lock.release()
    print(format_summary(summary))
    print("SUMMARY_JSON " + json.dumps(printed(summary), default=str))
    return 0 if summary["audit"]["ok"] else EXIT_AUDIT_FAILED


def cli() -> None:
    """The ``phi4mm-batch`` command (pyproject's console script): ``main`` with its exit status."""
    sys.exit(main())


if __name__ == "__main__":
    cli()
