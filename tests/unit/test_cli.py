"""`python -m jobs.run --set KEY=VALUE` (validated like the file, one line on a mistake) and `--dry-run`
(the CPU stage over every row, on the tiny model's tokenizer; no engine, no Ray, nothing written)."""

import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from jobs.make_sample_data import SCHEMA, sample_rows
from jobs.run import load_config, main, parse_args
from pipelines.dry_run import BENCHMARK, default_rate
from pipelines.output.parts import write_part_files
from schemas.rows import OUTPUT_SCHEMA
from tests.helpers import MEDIA, make_config


@pytest.fixture
def job(tiny_model, tmp_path):
    """The sample rows and a config file for the tiny model; returns (config path, output path)."""
    data = tmp_path / "in.parquet"
    pq.write_table(pa.Table.from_pylist(sample_rows(), schema=SCHEMA), data)
    raw = json.loads(make_config(tiny_model, tmp_path).model_dump_json(exclude_defaults=True))
    raw["input"].update(path=str(data), media_root=str(MEDIA))
    raw["output"]["mode"] = "resume"
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path), tmp_path / "out"


def test_set_overrides_any_key_with_yaml_values_after_the_options(job, tmp_path, monkeypatch):
    cfg, _ = job
    monkeypatch.chdir(tmp_path)
    args = parse_args(["--config", cfg, "--mode", "overwrite", "--set", "output.mode=error",
                       "--set", "engine.max_model_len=4096", "--set", "task={preset: translate, target_language: Greek}",
                       "--set", "sampling.stop=[x, y]", "--set", "output.path=rel/out"])  # fmt: skip
    config = load_config(args)
    assert config.output.mode == "error"  # the last word wins
    assert config.engine.max_model_len == 4096 and config.sampling.stop == ["x", "y"]
    assert config.task.preset == "translate" and config.task.target_language == "Greek"
    assert config.output.path == str(
        tmp_path / "rel" / "out"
    )  # a CLI path: relative to the current directory


@pytest.mark.parametrize(
    "setting, needles",
    [
        (
            "engine.max_model_lenn=1",
            ["--set engine.max_model_lenn=1", "engine.max_model_lenn", "unknown key"],
        ),
        ("engine.max_model_len=lots", ["--set engine.max_model_len=lots", "engine.max_model_len", "integer"]),
        ("task.preset=poem", ["--set task.preset=poem", "task.preset", "'caption'"]),
        ("engine.dtype.x=1", ["--set engine.dtype.x=1", "engine.dtype"]),
        ("no_equals_sign", ["--set", "KEY=VALUE", "--help"]),
        ("engine..x=1", ["--set", "KEY=VALUE"]),
        ("x=[unclosed", ["--set", "not YAML"]),
        ("media.preprocess_timeout_s=.inf", ["media.preprocess_timeout_s", "finite number"]),
        ("media.preprocess_timeout_s=.nan", ["media.preprocess_timeout_s", "finite number"]),
        ("media.preprocess_timeout_s=1e300", ["media.preprocess_timeout_s", "less than or equal to 86400"]),
        ("media.max_media_bytes=1000000000000000000000", ["media.max_media_bytes", "less than or equal"]),
    ],
)
def test_a_bad_set_is_one_line_naming_it(job, capsys, setting, needles):
    cfg, out = job
    assert main(["--config", cfg, "--set", setting]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("phi4mm-batch: error: ") and "Try " in lines[0], lines
    assert all(n in lines[0] for n in needles), lines[0]
    assert not out.exists()


def test_the_default_rate_is_the_committed_benchmarks_pipeline_steady_state():
    figures = json.loads(BENCHMARK.read_text())["figures"]
    tokens_per_row = (figures["pipeline.prompt_tokens"] + figures["pipeline.completion_tokens"]) / figures[
        "pipeline.rows"
    ]
    rate, source = default_rate()
    assert rate == pytest.approx(figures["pipeline.steady.rows_per_s"] * tokens_per_row)
    assert "H200" in source
    assert default_rate(BENCHMARK.with_name("no-such.json")) is None


def test_dry_run_prepares_every_row_and_writes_nothing(job, capsys):
    cfg, out = job
    assert main(["--config", cfg, "--dry-run"]) == 0
    stdout = capsys.readouterr().out
    report = json.loads(stdout.split("DRY_RUN_JSON ", 1)[1])
    assert report["rows"] == len(sample_rows()) and report["status"] == {"ok": 10, "error": 2}
    assert report["error_codes"] == {"IMAGE_DECODE_ERROR": 1, "MISSING_INPUT": 1}
    # each code with the ids and messages of its first rows: what went wrong, not only how often
    examples = report["error_examples"]
    assert [e["id"] for e in examples["IMAGE_DECODE_ERROR"]] == ["broken-truncated-jpeg"]
    assert [e["id"] for e in examples["MISSING_INPUT"]] == ["broken-empty-row"]
    for (example,) in examples.values():
        assert example["message"] and f"id {example['id']}: {example['message']}" in stdout
    assert report["ok_rows_by_modality"] == {"text": 2, "image": 4, "audio": 3, "image_audio": 1}
    assert all(t > 0 for t in report["prompt_tokens_by_modality"].values())
    assert report["completion_tokens_at_most"] == 10 * 8  # sampling.max_tokens per ok row
    total = sum(report["prompt_tokens_by_modality"].values()) + report["completion_tokens_at_most"]
    assert report["gpu_s"] == pytest.approx(total / default_rate()[0], abs=0.1)
    assert "prompt tokens by modality" in stdout and "GPU time" in stdout
    assert not out.exists()  # no lock, no directory, nothing


def test_dry_run_skips_what_resume_would_and_takes_a_given_rate(job, capsys):
    cfg, out = job
    done = [r["id"] for r in sample_rows()[:4]]
    rows = [{f.name: None for f in OUTPUT_SCHEMA} | {"id": i, "status": "ok"} for i in done]
    write_part_files(pa.Table.from_pylist(rows, schema=OUTPUT_SCHEMA), str(out), "earlier", 0, 100)
    before = sorted(os.listdir(out))
    assert (
        main(
            [
                "--config",
                cfg,
                "--dry-run",
                "--tokens-per-s",
                "100",
                "--set",
                "resources.generate.concurrency=2",
            ]
        )
        == 0
    )
    report = json.loads(capsys.readouterr().out.split("DRY_RUN_JSON ", 1)[1])
    assert report["rows"] == len(sample_rows()) - 4 and report["rows_skipped_already_done"] == 4
    total = sum(report["prompt_tokens_by_modality"].values()) + report["completion_tokens_at_most"]
    assert (
        report["gpu_s"] == pytest.approx(total / 100, abs=0.1) and report["rate_source"] == "--tokens-per-s"
    )
    assert report["wall_s_at_gpu_actors"] == pytest.approx(total / 200, abs=0.1)
    assert sorted(os.listdir(out)) == before


def test_dry_run_on_worker_processes_counts_as_in_this_process(job, capsys):
    """--workers N runs the CPU stage in N spawned processes (a big input's dry run uses every core);
    the report is the same as in this process, whatever order the batches finish in."""
    cfg, _ = job
    reports = {}
    for workers in ("1", "2"):
        assert (
            main(
                [
                    "--config",
                    cfg,
                    "--dry-run",
                    "--workers",
                    workers,
                    "--set",
                    "resources.preprocess.batch_size=3",
                ]
            )
            == 0
        )
        report = json.loads(capsys.readouterr().out.split("DRY_RUN_JSON ", 1)[1])
        assert report.pop("dry_run_workers") == int(workers)
        report.pop("dry_run_s")
        reports[workers] = report
    assert reports["1"] == reports["2"] and reports["1"]["status"] == {"ok": 10, "error": 2}


def _all_done(out) -> None:
    """The job's output as an earlier run left it: every sample row, broken-empty-row a MISSING_INPUT."""
    rows = [
        {f.name: None for f in OUTPUT_SCHEMA}
        | {"id": r["id"], "status": "ok"}
        | ({"status": "error", "error_code": "MISSING_INPUT"} if r["id"] == "broken-empty-row" else {})
        for r in sample_rows()
    ]
    write_part_files(pa.Table.from_pylist(rows, schema=OUTPUT_SCHEMA), str(out), "earlier", 0, 100)


def test_a_run_with_nothing_to_do_starts_no_ray(job, capsys, monkeypatch):
    """Every row done (and no error row of a --retry-errors code): the summary and exit 0, no Ray."""
    import ray

    cfg, out = job
    _all_done(out)
    started = []

    def init(*args, **kwargs):
        started.append(args)
        raise AssertionError("ray.init called")

    monkeypatch.setattr(ray, "init", init)
    for retry in ([], ["--retry-errors", "IMAGE_DECODE_ERROR"]):  # no such error row: nothing to do either
        assert main(["--config", cfg, *retry]) == 0
        stdout = capsys.readouterr().out
        summary = json.loads(stdout.split("SUMMARY_JSON ", 1)[1])
        assert not started and not ray.is_initialized()
        assert summary["nothing_to_do"] and summary["rows_written"] == 0 and summary["audit"]["ok"]
        assert summary["rows_skipped_already_done"] == summary["audit"]["output_rows"] == len(sample_rows())
        assert summary["input_files"]["read"] == 0 and "nothing to do" in stdout
        assert (out / f"_run-{summary['run_id']}.json").exists()
    # an error row of a chosen code: there is work, so Ray starts (here: the sentinel, a failed run)
    assert main(["--config", cfg, "--retry-errors", "MISSING_INPUT"]) == 3 and len(started) == 1


@pytest.mark.parametrize(
    "options, needles",
    [
        (
            ["--retry-errors", "MEDIA_NOT_FUND"],
            ["output.retry_errors", "'MEDIA_NOT_FUND' is not an error code"],
        ),
        (
            ["--retry-errors", "MISSING_INPUT", "--mode", "overwrite"],
            ["output.retry_errors", "output.mode: resume"],
        ),
        (["--retry-errors", " , "], ["--retry-errors", "names no error code"]),
    ],
)
def test_a_bad_retry_errors_is_one_line(job, capsys, options, needles):
    cfg, out = job
    assert main(["--config", cfg, *options]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "Try " in lines[0] and all(n in lines[0] for n in needles), lines
    assert not out.exists()


def test_dry_run_counts_the_rows_retry_errors_runs_again(job, capsys):
    cfg, out = job
    _all_done(out)
    assert main(["--config", cfg, "--dry-run", "--retry-errors", "MISSING_INPUT,IMAGE_DECODE_ERROR"]) == 0
    report = json.loads(capsys.readouterr().out.split("DRY_RUN_JSON ", 1)[1])
    assert report["rows"] == 1 and report["error_codes"] == {"MISSING_INPUT": 1}
    assert report["rows_skipped_already_done"] == len(sample_rows()) - 1


def test_the_phi4mm_batch_command_is_jobs_run_with_its_exit_status(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    command = Path(sys.executable).parent / "phi4mm-batch"  # installed with the project (pyproject's scripts)
    done = subprocess.run(
        [str(command), "--config", str(tmp_path / "no-such.yaml")], capture_output=True, text=True
    )
    assert done.returncode == 2  # a job mistake, as `python -m jobs.run` says it
    (line,) = done.stderr.strip().splitlines()
    assert "no-such.yaml" in line and "Try " in line
