import math
import subprocess
import sys
import typing
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
from pydantic import BaseModel, ValidationError

from jobs.make_sample_data import write_sample_dataset
from schemas.job import JobConfig
from schemas.model import PHI4MM
from schemas.rows import OUTPUT_COLUMN_DOCS, OUTPUT_SCHEMA
from tests.helpers import REPO

BASE = {"input": {"path": "in"}, "output": {"path": "out"}, "model": {"path": "m"}}


def test_model_facts():
    assert (PHI4MM.image_token_id, PHI4MM.audio_token_id) == (200010, 200011)
    assert PHI4MM.adapter_for(1, 0) == "vision"
    assert PHI4MM.adapter_for(1, 1) == "vision"
    assert PHI4MM.adapter_for(0, 2) == "speech"
    assert PHI4MM.adapter_for(0, 0) is None
    assert PHI4MM.adapter_dir("speech") == "speech-lora"


def test_every_config_field_is_described():
    def walk(model):
        for name, field in model.model_fields.items():
            assert field.description, f"{model.__name__}.{name} has no description"
            ann = field.annotation
            if isinstance(ann, type) and hasattr(ann, "model_fields"):
                walk(ann)

    walk(JobConfig)


def test_every_output_column_is_documented():
    assert set(OUTPUT_COLUMN_DOCS) == set(OUTPUT_SCHEMA.names)


@pytest.mark.parametrize(
    "patch,needle",
    [
        ({"engine": {"max_model_len": 100}, "sampling": {"max_tokens": 100}}, "Try lowering sampling.max_tokens"),
        ({"engine": {"tensor_parallel_size": 2}, "resources": {"generate": {"num_gpus": 2}}}, "executor"),
        ({"engine": {"tensor_parallel_size": 2, "executor": "mp"}, "resources": {"generate": {"num_gpus": 1}}},
         "must equal engine.tensor_parallel_size"),
        ({"resources": {"generate": {"concurrency": (3, 1)}}}, "min <= max"),
        ({"engine": {"tensor_parallel_size": 2, "executor": "ray"}, "resources": {"generate": {"num_gpus": 2}}},
         "Try executor: mp"),
        ({"resources": {"generate": {"num_gpus": 0.7}}}, "two engines cannot share it"),
        ({"resources": {"generate": {"num_gpus": 0.5}}}, "Try gpu_memory_utilization: 0.45"),
        ({"engine": {"gpu_memory_utilization": 0.42}, "resources": {"generate": {"num_gpus": 0.5}}},
         "need their KV cache set outright"),
        ({"media": {"chunk_seconds": 4, "chunk_overlap_seconds": 2}}, "under half"),
        ({"engine": {"max_model_lenn": 1}}, "Extra inputs are not permitted"),
    ],
)  # fmt: skip
def test_invalid_combinations_fail_with_advice(patch, needle):
    raw = {**BASE, **patch}
    with pytest.raises(ValidationError, match=needle):
        JobConfig.model_validate(raw)


def test_from_yaml_resolves_paths_against_the_file(tmp_path):
    cfg_file = tmp_path / "conf" / "job.yaml"
    cfg_file.parent.mkdir()
    cfg_file.write_text(
        "input: {path: ../data}\noutput: {path: s3://bucket/out}\nmodel: {path: /abs/model}\n"
    )
    cfg = JobConfig.from_yaml(cfg_file, {"input.limit": 5, "sampling.max_tokens": 9})
    assert cfg.input.path == str((tmp_path / "data").resolve())
    assert cfg.output.path == "s3://bucket/out"
    assert cfg.model.path == "/abs/model"
    assert (cfg.input.limit, cfg.sampling.max_tokens) == (5, 9)


def test_from_yaml_resolves_media_roots_against_the_file(tmp_path):
    cfg_file = tmp_path / "conf" / "job.yaml"
    cfg_file.parent.mkdir()
    cfg_file.write_text(
        "input: {path: /data, media_root: media, allowed_media_roots: [shared, ../more, /abs, 's3://b/x/']}\n"
        "output: {path: /out}\nmodel: {path: /m}\n"
    )
    cfg = JobConfig.from_yaml(cfg_file)
    assert cfg.input.media_root == str(tmp_path / "conf" / "media")
    assert cfg.input.allowed_media_roots == [
        str(tmp_path / "conf" / "shared"), str(tmp_path / "more"), "/abs", "s3://b/x/",
    ]  # fmt: skip
    with pytest.raises(ValidationError, match="is relative"):  # outside a YAML a relative root is refused
        JobConfig.model_validate(
            {"input": {"path": "/d", "allowed_media_roots": ["shared"]}, "output": {"path": "/o"},
             "model": {"path": "/m"}}
        )  # fmt: skip


@pytest.mark.parametrize("path", sorted((REPO / "jobs" / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_bundled_configs_load(path):
    cfg = JobConfig.from_yaml(path)
    if path.name == "demo.yaml":
        assert cfg.model.load_format == "dummy" and cfg.engine.enforce_eager


def test_sample_dataset_is_hf_datasets_layout(tmp_path):
    import datasets

    path = write_sample_dataset(tmp_path / "sample.parquet")
    features = datasets.Dataset.from_parquet(str(path)).features
    assert isinstance(features["image"], datasets.Image)
    assert isinstance(features["audio"], datasets.Audio)
    table = pq.read_table(path)
    assert table.schema.field("image").type.names == ["bytes", "path"]


def test_light_packages_import_no_heavy_modules():
    code = (
        "import sys, schemas, schemas.job, schemas.rows, pipelines, actors, actors.preprocess, actors.generate;"
        "heavy = [m for m in ('torch', 'vllm', 'ray', 'transformers') if m in sys.modules];"
        "print(','.join(heavy))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=Path(REPO), check=True
    )
    assert out.stdout.strip() == ""


def test_stages_take_scheduling_from_the_config(tmp_path):
    from pipelines.phi4mm import build_stages

    cfg = JobConfig.model_validate(
        {
            **BASE,
            "resources": {"generate": {"concurrency": [1, 3], "max_restarts": 2, "concurrent_batches": 3}},
            "engine": {"env": {"A": "1"}},
        }  # fmt: skip
    )
    pre, gen = build_stages(cfg, "run")
    assert gen.resources is cfg.resources.generate and pre.resources is cfg.resources.preprocess
    assert (gen.resources.concurrency, gen.resources.max_restarts, gen.resources.concurrent_batches) == (
        (1, 3),
        2,
        3,
    )
    assert gen.env == {"A": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}  # in-process engine with 'uni'
    assert pre.resources.max_restarts == 8 and pre.resources.num_gpus == 0


# --- every number in a config is finite and bounded --------------------------------------------------


def _leaves(annotation):
    """The plain types inside an annotation (unions, lists, dicts, tuples, Annotated unwrapped)."""
    args = typing.get_args(annotation)
    if not args:
        yield annotation
    for arg in args if typing.get_origin(annotation) is not typing.Annotated else args[:1]:
        yield from _leaves(arg)


def _numeric_fields(model=JobConfig, prefix="", seen=None):
    """(model, field name, dotted key, whether a (min, max) tuple) for every int or float field reachable
    from ``model``: a field added later is swept too."""
    seen = set() if seen is None else seen
    if model in seen:
        return
    seen.add(model)
    for name, field in model.model_fields.items():
        leaves = list(_leaves(field.annotation))
        for leaf in leaves:
            if isinstance(leaf, type) and issubclass(leaf, BaseModel):
                yield from _numeric_fields(leaf, f"{prefix}{name}.", seen)
        if any(leaf in (int, float) for leaf in leaves):
            pair = any(typing.get_origin(a) is tuple for a in typing.get_args(field.annotation))
            yield model, name, f"{prefix}{name}", pair


NUMERIC_FIELDS = list(_numeric_fields())


def test_the_sweep_finds_every_section():
    keys = {key for _, _, key, _ in NUMERIC_FIELDS}
    assert {"media.preprocess_timeout_s", "engine.seed", "resources.preprocess.concurrency",
            "tasks.n", "repetition.min_count", "model.adapters.max_bytes", "storage.max_attempts"} <= keys  # fmt: skip
    assert len(keys) > 40


@pytest.mark.parametrize("model, name, key, pair", NUMERIC_FIELDS, ids=[k for _, _, k, _ in NUMERIC_FIELDS])
@pytest.mark.parametrize(
    "bad",
    [math.inf, -math.inf, math.nan, 1e300, 10**300, -(10**300)],
    ids=["inf", "-inf", "nan", "1e300", "10**300", "-10**300"],
)
def test_every_numeric_setting_is_finite_and_bounded(model, name, key, pair, bad):
    for value in (bad, (1, bad)) if pair else (bad,):
        with pytest.raises(ValidationError) as e:
            model.model_validate({name: value})
        refused = [  # at the field, or by the model's own check naming it
            err
            for err in e.value.errors()
            if (err["loc"][:1] == (name,) and err["type"] != "missing")
            or (not err["loc"] and name in err["msg"])
        ]
        assert refused, f"{key}={value!r} is accepted"


@pytest.mark.parametrize("value", [".inf", "-.inf", ".nan", "1e300", "inf"])
def test_a_non_finite_time_limit_is_refused_in_yaml(tmp_path, value):
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(BASE) + f"media: {{preprocess_timeout_s: {value}}}\n")
    with pytest.raises(ValidationError) as e:
        JobConfig.from_yaml(path)
    assert [err["loc"] for err in e.value.errors()] == [("media", "preprocess_timeout_s")]


def test_a_requests_completion_budget_is_the_rows_then_the_tasks_then_the_jobs():
    tasks = {"short": {"preset": "caption", "max_tokens": 16},
             "free": {"preset": "caption"}}  # fmt: skip
    config = JobConfig.model_validate({**BASE, "sampling": {"max_tokens": 64}, "tasks": tasks})
    assert config.max_tokens(8, "short") == 8  # the row's own wins
    assert config.max_tokens(None, "short") == 16 and config.max_tokens(None, "free") == 64
    assert config.max_tokens() == 64  # no task named: the largest any task may have
    plain = JobConfig.model_validate({**BASE, "sampling": {"max_tokens": 32}})
    assert plain.max_tokens() == 32 and plain.max_tokens(5) == 5
