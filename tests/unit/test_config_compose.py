"""Configs compose: several `--config` files merged in order (each one's relative paths against its own
directory), the shipped CPU profile under any task preset, and `--set` values read as users type them."""

from operator import attrgetter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs.make_sample_data import SCHEMA, sample_rows
from jobs.run import load_config, main, parse_args
from pipelines.placement import actor_requests, unplaceable
from pipelines.validate import validate_job
from schemas.job import JobConfig
from tests.helpers import REPO

CONFIGS = REPO / "jobs" / "configs"
CPU = CONFIGS / "profiles" / "cpu.yaml"


def _write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return str(path)


@pytest.fixture
def base_and_profile(tmp_path):
    """A base config in base/ and a profile in profile/, both with relative paths."""
    base = _write(
        tmp_path / "base" / "job.yaml",
        "input: {path: data/in.parquet, allowed_media_roots: [media]}\noutput: {path: out}\nmodel: {path: m}\n"
        "engine: {max_model_len: 4096, env: {A: 'a'}}\nsampling: {max_tokens: 9, stop: [x, y]}\n",
    )
    profile = _write(
        tmp_path / "profile" / "cpu.yaml",
        "output: {path: elsewhere}\nengine: {max_num_seqs: 3, env: {B: 'b'}}\nsampling: {stop: [z]}\n",
    )
    return base, profile


def test_several_configs_merge_in_order_each_relative_to_its_own_directory(base_and_profile, tmp_path):
    base, profile = base_and_profile
    config = load_config(
        parse_args(["--config", base, "--config", profile, "--set", "sampling.max_tokens=5"])
    )
    assert config.input.path == str(tmp_path / "base" / "data" / "in.parquet")
    assert config.input.allowed_media_roots == [str(tmp_path / "base" / "media")]
    assert config.model.path == str(tmp_path / "base" / "m")
    assert config.output.path == str(tmp_path / "profile" / "elsewhere")  # the later file wins
    assert (config.engine.max_model_len, config.engine.max_num_seqs) == (4096, 3)  # key by key
    assert config.engine.env == {"A": "a", "B": "b"}
    assert config.sampling.stop == ["z"]  # a list is replaced whole
    assert config.sampling.max_tokens == 5  # --set after every file
    assert JobConfig.from_yaml([base, profile]) == JobConfig.from_yaml(
        [base, profile], {"sampling.max_tokens": 9}
    )


@pytest.mark.parametrize("broken", ["base", "profile"])
def test_a_mistake_names_the_file_that_made_it(base_and_profile, capsys, broken):
    files = dict(zip(["base", "profile"], base_and_profile, strict=True))
    with open(files[broken], "a") as f:
        f.write("model: {max_lora_rnk: 8}\n" if broken == "profile" else "media: {max_image_pixelz: 1}\n")
    assert main(["--config", files["base"], "--config", files["profile"]]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"phi4mm-batch: error: {files[broken]}: "), lines
    assert "unknown key" in lines[0]


@pytest.fixture
def sample_input(tmp_path):
    """The sample rows with the columns every preset names (task_custom's sku, photo, title, category)."""
    table = pa.Table.from_pylist(sample_rows(), schema=SCHEMA)
    for name, like in (
        ("sku", "id"),
        ("photo", "image"),
        ("question", "prompt"),
        ("title", "id"),
        ("category", "id"),
    ):
        table = table.append_column(name, table.column(like))
    pq.write_table(table, tmp_path / "in.parquet")
    return str(tmp_path / "in.parquet")


@pytest.mark.parametrize("preset", sorted(CONFIGS.glob("task_*.yaml")), ids=lambda p: p.name)
def test_the_cpu_profile_runs_every_task_preset_on_a_cpu(preset, tiny_model, sample_input, tmp_path):
    argv = ["--config", str(preset), "--config", str(CPU), "--input", sample_input, "--output",
            str(tmp_path / "out"), "--model", tiny_model, "--limit", "4"]  # fmt: skip
    config = load_config(parse_args(argv))
    validate_job(config, "r1", writes=True)  # the job-level checks jobs.run makes before Ray
    assert unplaceable(actor_requests(config), [{"CPU": 2.0}]) == []  # a 2-core machine without a GPU
    assert config.task == JobConfig.from_yaml(preset).task  # the preset's task is kept
    assert config.model.load_format == "dummy" and config.engine.dtype == "float32"


def test_the_demo_is_the_cpu_profile_over_the_sample_data():
    demo = CONFIGS / "demo.yaml"
    assert JobConfig.from_yaml([demo, CPU]) == JobConfig.from_yaml(demo)  # the two cannot drift apart


@pytest.mark.parametrize(
    "setting, section, expected",
    [
        ("resources.preprocess={concurrency:1,batch_size:8}", "resources.preprocess", {"concurrency": 1, "batch_size": 8}),
        ("resources.generate={num_gpus:0, batch_size: 4}", "resources.generate", {"num_gpus": 0, "batch_size": 4}),
        ("output.column_names={text:caption}", "output", {"column_names": {"text": "caption"}}),
        ("storage={s3_endpoint:http://minio:9000}", "storage", {"s3_endpoint": "http://minio:9000"}),
        ("task={preset: custom, template: 'a,b:c'}", "task", {"template": "a,b:c"}),
        ("engine.env.X=1", "engine", {"env": {"A": "a", "X": "1"}}),  # env values are text
        ("engine.env.X=0.10", "engine", {"env": {"A": "a", "X": "0.10"}}),  # as typed, not 0.1
        ("model.name=1234", "model", {"name": "1234"}),
    ],
)  # fmt: skip
def test_set_values_read_as_users_type_them(base_and_profile, setting, section, expected):
    base, _ = base_and_profile
    config = load_config(parse_args(["--config", base, "--set", setting]))
    got = attrgetter(section)(config).model_dump()
    assert {k: got[k] for k in expected} == expected


@pytest.mark.parametrize(
    "file_text, setting, needles",
    [
        ("resources: {preprocess: {concurrency:1}}\n", None, ["resources.preprocess.concurrency:1",
                                                             "space after the colon", "Try {concurrency: 1,"]),
        (None, "engine.env={X: 1}", ["--set engine.env={'X': 1}", "engine.env.X", "Try quoting it"]),
        ("engine: {env: {X: 1}}\n", None, ["engine.env.X", "YAML reads 1 as a number", "Try quoting it"]),
    ],
)  # fmt: skip
def test_what_cannot_be_read_as_typed_is_one_line_saying_how(
    base_and_profile, capsys, file_text, setting, needles
):
    base, profile = base_and_profile
    argv = ["--config", base]
    if file_text:
        argv += ["--config", _write(Path(profile), file_text)]
        needles = [f"{profile}: ", *needles]
    if setting:
        argv += ["--set", setting]
    assert main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "Try " in lines[0] and all(n in lines[0] for n in needles), lines
