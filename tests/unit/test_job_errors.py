"""Job-level mistakes: `python -m jobs.run` exits 2 with one line on stderr that names the file, key or
path and says what to try, before Ray starts and before the output is touched."""

import json
import os
import socket
import subprocess
import sys
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from jobs.run import main
from pipelines.output.commit import commit_run
from pipelines.output.lock import OutputLock
from pipelines.output.parts import write_part_files
from pipelines.validate import validate_job
from schemas.job import JobConfig
from schemas.rows import OUTPUT_SCHEMA
from tests.helpers import REPO, write_adapter


@pytest.fixture
def job(tmp_path):
    """A model directory with the files validation looks for, a small input and a config writer."""
    model = tmp_path / "model"
    for sub in ("vision-lora", "speech-lora"):
        (model / sub).mkdir(parents=True)
        (model / sub / "adapter_config.json").write_text('{"r": 8}')
    (model / "config.json").write_text("{}")
    data = tmp_path / "in"
    data.mkdir()
    pq.write_table(pa.table({"id": ["a", "b", "c"], "prompt": ["x", "y", "z"]}), data / "one.parquet")

    class Job:
        path, input, output = tmp_path, data, tmp_path / "out"

        @staticmethod
        def config(text: str | None = None, **sections) -> str:
            raw = {
                "input": {"path": str(data)},
                "output": {"path": str(tmp_path / "out")},
                "model": {"path": str(model)},
            }
            for name, values in sections.items():
                raw.setdefault(name, {}).update(values)
            cfg = tmp_path / "job.yaml"
            cfg.write_text(text if text is not None else yaml.safe_dump(raw))
            return str(cfg)

    return Job


def _snapshot(path):
    if not path.exists():
        return None
    return sorted((str(p.relative_to(path)), p.stat().st_mtime_ns) for p in path.rglob("*"))


def _fails(job, capsys, args, *needles):
    """Run main(args): exit status 2, exactly one stderr line naming ``needles`` with advice, output untouched."""
    before = _snapshot(job.output)
    assert main(args) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("phi4mm-batch: error: ") and "Try" in lines[0], lines[0]
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert _snapshot(job.output) == before  # not created, not changed
    return lines[0]


def test_yaml_syntax_error_names_the_line(job, capsys):
    cfg = job.config("input:\n  path: x\nmodel: {path: [y\n")
    _fails(job, capsys, ["--config", cfg], cfg, "line 4")


def test_a_top_level_list_is_refused(job, capsys):
    cfg = job.config("- input\n- output\n")
    _fails(job, capsys, ["--config", cfg], cfg, "not a mapping")


def test_a_key_given_twice_is_refused(job, capsys):
    cfg = job.config()
    with open(cfg, "a") as f:
        f.write("model:\n  path: /elsewhere\n")  # a second model section would silently replace the first
    _fails(job, capsys, ["--config", cfg], "key 'model' is given twice", "line")


def test_a_missing_config_file(job, capsys):
    _fails(job, capsys, ["--config", str(job.path / "nope.yaml")], "nope.yaml", "does not exist")


def test_validation_errors_are_one_line_per_field(job, capsys):
    cfg = job.config(model={"max_lora_rank": -8})
    _fails(job, capsys, ["--config", cfg], "model.max_lora_rank", "greater than or equal to 1", "-8")
    cfg = job.config(engine={"max_model_lenn": 1})
    _fails(job, capsys, ["--config", cfg], "engine.max_model_lenn: unknown key")
    cfg = job.config(engine={"max_model_len": 100}, sampling={"max_tokens": 100})  # a cross-field check
    _fails(job, capsys, ["--config", cfg], "sampling.max_tokens (100)")


def test_a_lora_rank_vllm_does_not_accept_is_refused_with_the_rank_to_use(job, capsys):
    cfg = job.config(model={"max_lora_rank": 10})
    _fails(
        job, capsys, ["--config", cfg], "model.max_lora_rank", "not a rank vLLM accepts", "max_lora_rank: 16"
    )


@pytest.mark.parametrize(
    "text",
    [
        '{"r": 8',
        '{"rank": 8}',
        '{"r": "eight"}',
        '{"r": 1024}',
        '{"r": 8, "rank_pattern": ["x"]}',
        '{"r": 1e999}',
    ],
)
def test_a_checkpoint_adapter_config_that_cannot_be_read(job, capsys, text):
    (job.path / "model" / "speech-lora" / "adapter_config.json").write_text(text)
    _fails(job, capsys, ["--config", job.config()], "speech adapter", "speech-lora/adapter_config.json")


def test_two_bad_fields_give_two_lines(job, capsys):
    cfg = job.config(model={"max_lora_rank": 0}, engine={"dynamic_hd": 0})
    assert main(["--config", cfg]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 2 and "model.max_lora_rank" in lines[0] and "engine.dynamic_hd" in lines[1]


def test_limit_zero_is_refused(job, capsys):
    _fails(job, capsys, ["--config", job.config(), "--limit", "0"], "--limit", "at least 1")


def test_a_missing_input_path(job, capsys):
    missing = str(job.path / "no-such-input")
    _fails(
        job, capsys, ["--config", job.config(), "--input", missing], "input.path", missing, "does not exist"
    )


def test_a_directory_without_parquet_files(job, capsys):
    empty = job.path / "empty"
    empty.mkdir()
    (empty / "_hidden.parquet").write_bytes(b"skipped like Ray skips it")
    _fails(job, capsys, ["--config", job.config(), "--input", str(empty)], str(empty), "no .parquet files")


@pytest.mark.parametrize("what", ["missing", "no config.json", "no adapters"])
def test_a_bad_model_directory(job, capsys, what):
    model = job.path / "model"
    if what == "missing":
        model = job.path / "no-model"
        needle = "does not exist"
    elif what == "no config.json":
        (model / "config.json").unlink()
        needle = "no config.json"
    else:
        (model / "speech-lora" / "adapter_config.json").unlink()
        needle = "model.use_lora: false"
    _fails(job, capsys, ["--config", job.config(), "--model", str(model)], "model.path", str(model), needle)


def test_a_bad_custom_adapter_is_refused_before_anything_starts(job, capsys):
    write_adapter(job.path / "mine", r=1024)  # relative in the YAML: next to it
    config = job.config(model={"adapters": {"speech": "mine"}})
    _fails(job, capsys, ["--config", config], "model.adapters.speech", str(job.path / "mine"), "r=1024")
    write_adapter(job.path / "mine", target_modules=["q_proj"])
    _fails(job, capsys, ["--config", config], "model.adapters.speech", "['q_proj']")
    _fails(job, capsys, ["--config", config, "--set", "model.adapters.speech=elsewhere"], "does not exist")
    write_adapter(job.path / "mine", r=64)
    _fails(job, capsys, ["--config", config, "--set", "model.max_lora_rank=16"], "model.max_lora_rank 16",
           "speech adapter (64)", "max_lora_rank: 64")  # fmt: skip


def test_a_corrupt_file_in_the_input_directory_is_named(job, capsys):
    (job.input / "two.parquet").write_bytes(b"PAR1 this is not parquet")
    _fails(
        job, capsys, ["--config", job.config()], str(job.input / "two.parquet"), "not a readable Parquet file"
    )


def test_unmergeable_schemas_name_the_files_and_the_column(job, capsys):
    pq.write_table(pa.table({"id": ["d"], "prompt": [[1, 2]]}), job.input / "two.parquet")
    line = _fails(job, capsys, ["--config", job.config()], "'prompt'", "one.parquet", "two.parquet")
    assert "list<" in line


def test_a_wrong_id_column(job, capsys):
    cfg = job.config(input={"columns": {"id": "key"}})
    _fails(job, capsys, ["--config", cfg], "no id column 'key'", "input.columns.id")


def test_null_and_empty_ids_are_refused_with_their_rows(job, capsys):
    pq.write_table(pa.table({"id": ["d", None, ""], "prompt": ["x"] * 3}), job.input / "two.parquet")
    _fails(job, capsys, ["--config", job.config()], "null or empty in 2 rows", "two.parquet row 1", "row 2")


def test_duplicate_ids_are_refused_and_listed(job, capsys):
    pq.write_table(pa.table({"id": ["c", "a", "a", "q"], "prompt": ["x"] * 4}), job.input / "two.parquet")
    _fails(job, capsys, ["--config", job.config()], "not unique", "'a' x3", "'c' x2")


def test_float_ids_that_collide_as_text_are_duplicates(job, capsys):
    pq.write_table(pa.table({"id": [1.0, 2.5], "prompt": ["x"] * 2}), job.input / "one.parquet")
    pq.write_table(pa.table({"id": [1.0], "prompt": ["x"]}), job.input / "two.parquet")
    _fails(job, capsys, ["--config", job.config()], "'1' x2")


def test_binary_ids_that_are_not_text_are_refused(job, capsys):
    pq.write_table(
        pa.table({"id": pa.array([b"\xff\x00"], pa.binary()), "prompt": ["x"]}), job.input / "one.parquet"
    )
    _fails(job, capsys, ["--config", job.config()], "input.columns.id 'id'", "binary")


def _existing_output(job):
    rows = pa.Table.from_pylist([{"id": "a", "status": "ok"}], schema=OUTPUT_SCHEMA)
    write_part_files(rows, str(job.output), "old", 0, 10)


def test_mode_error_on_existing_output(job, capsys):
    _existing_output(job)
    _fails(
        job, capsys, ["--config", job.config(), "--mode", "error"], str(job.output), "Try output.mode: resume"
    )


def test_an_overwrite_that_fails_validation_leaves_the_old_output(job, capsys):
    _existing_output(job)
    cfg = job.config(input={"columns": {"id": "key"}}, output={"mode": "overwrite"})
    _fails(job, capsys, ["--config", cfg], "no id column")
    assert pq.read_table(job.output).column("id").to_pylist() == ["a"]


def test_an_output_inside_the_input_is_refused(job, capsys):
    inside = str(job.input / "out")
    _fails(job, capsys, ["--config", job.config(), "--output", inside], "is inside input.path")


@pytest.fixture
def no_ray(monkeypatch):
    """These jobs must be refused before Ray starts: starting it fails the test at once."""

    def start():
        raise AssertionError("Ray started: validation let the job through")

    monkeypatch.setattr("jobs.run.init_ray", start)


def _input_file(path, ids=("a", "b")):
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"id": list(ids), "prompt": ["x"] * len(ids)}), path)
    return path


@pytest.mark.parametrize("mode", ["resume", "overwrite"])
def test_an_input_file_among_the_output_parts_is_refused(job, capsys, no_ray, mode):
    """Taken for output, its rows were skipped as done (resume) or the file deleted (overwrite)."""
    part = _input_file(job.output / "part-00000.parquet")
    args = ["--config", job.config(), "--input", str(part), "--mode", mode]
    _fails(job, capsys, args, f"input.path {part} is output.path {job.output} or inside it", "Try an input")
    assert pq.read_table(part).column("id").to_pylist() == ["a", "b"]


@pytest.mark.parametrize(
    "how", ["same folder", "file:// and a slash", "input folder inside", "linked output", "linked input file"]
)
def test_input_and_output_never_overlap(job, capsys, no_ray, how):
    out, needle = str(job.output), "is output.path"
    if how == "same folder":
        out = str(job.input)
    elif how == "file:// and a slash":
        out = f"file://{job.input}/"
    elif how == "input folder inside":
        _input_file(job.output / "data" / "one.parquet")
        job.input = job.output / "data"
    elif how == "linked output":
        (job.path / "link").symlink_to(job.input)  # the output is the input, under another name
        out = str(job.path / "link")
    else:
        part = _input_file(job.output / "part-00000.parquet")
        (job.input / "two.parquet").symlink_to(part)  # an input file that is one of the output's parts
        needle = f"input file {job.input / 'two.parquet'} is a link into output.path"
    _fails(job, capsys, ["--config", job.config(), "--input", str(job.input), "--output", out], needle)


def test_an_overwrite_refuses_part_files_no_run_wrote(job, capsys, no_ray):
    files = write_part_files(pa.Table.from_pylist([{"id": "a", "status": "ok"}], schema=OUTPUT_SCHEMA),
                             str(job.output), "old", 0, 10).files  # fmt: skip
    commit_run(str(job.output), "old", "resume", files)
    stray = _input_file(job.output / "part-00000.parquet")  # copied in by hand
    cfg = job.config()
    _fails(
        job, capsys, ["--config", cfg, "--mode", "overwrite"], "part-00000.parquet", "no run of this output"
    )
    assert stray.exists()


@pytest.mark.parametrize("where", ["/proc/phi4mm-out", "/sys/phi4mm-out", "a file"])
def test_an_output_that_cannot_be_written_is_refused(job, capsys, no_ray, where):
    if where == "a file":
        (job.path / "file").write_text("not a directory")
        where = str(job.path / "file" / "out")
    _fails(
        job, capsys, ["--config", job.config(), "--output", where], f"output.path {where} cannot be written"
    )
    assert not os.path.exists(where)


def test_object_store_outputs_that_cannot_be_used_are_one_line(job, capsys, no_ray, s3):
    """A missing bucket, access denied, writes denied, an input among the parts: exit 2, nothing written."""
    storage = {"storage": {"s3_endpoint": s3.endpoint}}
    missing = f"s3://{s3.name}-missing/out"
    _fails(job, capsys, ["--config", job.config(**storage), "--output", missing], "bucket", "does not exist")
    faults = s3.server.faults if s3.server else pytest.skip("fault knobs need the project's test server")
    cfg = job.config(**storage, output={"path": s3.url("out")})
    faults.deny(1000, "out")  # credentials without access to the output's prefix
    _fails(job, capsys, ["--config", cfg], f"output.path {s3.url('out')} cannot be reached", "ACCESS_DENIED")
    faults.deny(1000, "out", "PUT")  # may read, may not write: found by the lock, the first write
    _fails(job, capsys, ["--config", cfg], f"output.path {s3.url('out')} cannot be written", "ACCESS_DENIED")
    faults.deny(0)
    assert s3.keys() == []
    config = JobConfig.from_yaml(cfg)  # a valid output on the store passes, and its lock can be taken
    validate_job(config, "r1")
    OutputLock(config.output.path, "r1").acquire().release()
    part = s3.put("out/part-00000.parquet", (job.input / "one.parquet").read_bytes())
    _fails(job, capsys, ["--config", cfg, "--input", part], f"input.path {part} is output.path")
    assert s3.keys() == ["out/part-00000.parquet"]


def test_an_output_another_run_writes_is_refused(job, capsys):
    job.output.mkdir()
    lock = {"run_id": "busy-run", "host": socket.gethostname(), "pid": os.getpid(), "started": time.time()}
    (job.output / "_lock").write_text(json.dumps(lock | {"heartbeat": time.time()}))
    _fails(job, capsys, ["--config", job.config()], f"output {job.output} is being written by run busy-run")


def test_a_run_id_the_output_already_holds(job, capsys):
    _existing_output(job)
    _fails(job, capsys, ["--config", job.config(), "--run-id", "old"], "run id old already wrote")


def test_the_cli_prints_one_line_and_nothing_else(job):
    cfg = job.config(model={"max_lora_rank": -1})
    proc = subprocess.run(
        [sys.executable, "-m", "jobs.run", "--config", cfg],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and proc.stdout == ""
    assert (
        proc.stderr.count("\n") == 1
        and "model.max_lora_rank" in proc.stderr
        and "Traceback" not in proc.stderr
    )


@pytest.mark.parametrize(
    "sections, needles",
    [
        ({"task": {"preset": "ocr"}, "tasks": {"t": {"preset": "ocr"}}}, ["task and tasks"]),
        ({"tasks": {"status": {"preset": "ocr"}}}, ["tasks.status", "already an output column"]),
        ({"tasks": {"t": {"preset": "custom", "template": "About {title}."}}}, ["tasks.t.template", "title"]),
    ],
)
def test_a_bad_tasks_section_is_one_line(job, capsys, sections, needles):
    _fails(job, capsys, ["--config", job.config(**sections)], *needles)


def test_a_job_error_shows_urls_without_their_secrets(job, capsys):
    url = "https://user:PASSWORD@host.example/in/?sv=2022-11-02&sig=SASSECRET&X-Amz-Signature=AMZSECRET"
    line = _fails(
        job, capsys, ["--config", job.config(), "--input", url], "input.path https://***@host.example"
    )
    assert "SECRET" not in line and "PASSWORD" not in line and "sv=2022-11-02" in line


def _alias_bomb(levels: int = 8) -> str:
    """A JSON schema in YAML flow style, ``allOf`` ten aliases of ten aliases ... of ``{type: string}``:
    10**levels subschemas from ~500 bytes."""
    items = ["&s0 {type: string}"]
    items += [f"&s{n} {{allOf: [" + ", ".join([f"*s{n - 1}"] * 10) + "]}" for n in range(1, levels + 1)]
    return "{allOf: [" + ", ".join(items) + "]}"


@pytest.mark.parametrize("where", ["file", "--set"])
def test_an_alias_bomb_is_refused_at_once(job, where):
    # 10**8 subschemas hung validation (the schema's checks walk them); a child process bounds the test
    cfg = job.config()
    args = ["--set", f"structured.json_schema={_alias_bomb()}"]
    if where == "file":
        args = []
        with open(cfg, "a") as f:
            f.write(f"structured: {{json_schema: {_alias_bomb()}}}\n")
    proc = subprocess.run(
        [sys.executable, "-m", "jobs.run", "--config", cfg, *args],
        cwd=REPO, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr[-2000:]
    assert "more than 100,000 values" in proc.stderr and "Try" in proc.stderr


@pytest.mark.parametrize(
    "text, needle",
    [
        ("a: &a [1, *a]\n", "contains itself"),
        ("model: " + "[" * 20_000 + "]" * 20_000 + "\n", "nests values more deeply"),
        ("model: {path: " + "x" * 1_000_001 + "}\n", "longer than 1,000,000 characters"),
    ],
    ids=["recursive-alias", "deep-nesting", "too-long"],
)
def test_a_config_past_the_yaml_bounds_is_one_line(job, capsys, text, needle):
    _fails(job, capsys, ["--config", job.config(text)], "job.yaml: the YAML", needle)
