"""A captioning job's output read as it is: a Hugging Face datasets image dataset, captioned through the
whole pipeline (local Ray, the real vLLM CPU engine, SigLIP shrunk), read back with
``datasets.load_dataset("parquet", ...)`` with its features: the caption under its configured name, the
carried image an Image again. The run's manifest has its provenance and rates PNG; progress was logged."""

import io
import json
import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipelines.phi4mm import run_pipeline
from pipelines.provenance import config_hash, file_hash
from schemas.job import JobConfig
from tests.helpers import make_config


class _Lines(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())


@pytest.fixture(scope="module")
def captioned(local_ray, tiny_model, tmp_path_factory):
    import datasets

    tmp_path = tmp_path_factory.mktemp("captioned")

    picture = Image.fromarray((np.random.default_rng(1).random((30, 40, 3)) * 255).astype(np.uint8))
    source = datasets.Dataset.from_dict(
        {"id": ["picture", "no-picture"], "image": [picture, None], "source": ["cam-1/0001.png", None]}
    ).cast_column("image", datasets.Image())
    source.to_parquet(str(tmp_path / "in.parquet"))
    out = tmp_path / "out"
    config = make_config(
        tiny_model,
        tmp_path,
        input={"path": str(tmp_path / "in.parquet"), "columns": {"audio": None, "prompt": None}},
        output={"path": str(out), "column_names": {"text": "caption"}, "carry_columns": ["image", "source"]},
        task={"preset": "caption"},
        engine={"init_hook": "jobs.tiny_vision:shrink_siglip"},
        progress={"every_s": 1},
    )
    progress, handler = logging.getLogger("phi4mm_batch.progress"), _Lines()
    level = progress.level
    progress.setLevel(logging.INFO)
    progress.addHandler(handler)
    try:
        summary = run_pipeline(config, run_id="hf")
    finally:
        progress.removeHandler(handler)
        progress.setLevel(level)
    return config, summary, out, picture, handler.lines


def test_datasets_reads_the_output_with_its_features(captioned):
    import datasets

    _, summary, out, picture, _ = captioned
    assert summary["audit"]["ok"]
    ds = datasets.load_dataset("parquet", data_files=str(out / "part-*.parquet"), split="train")
    assert ds.features["caption"] == datasets.Value("string")
    assert ds.features["image"] == datasets.Image()  # carried, and an image again
    assert ds.features["source"] == datasets.Value("string")
    assert ds.features["prompt_tokens"] == datasets.Value("int32")
    rows = {r["id"]: r for r in ds}
    ok, missing = rows["picture"], rows["no-picture"]
    assert ok["status"] == "ok" and isinstance(ok["caption"], str) and ok["source"] == "cam-1/0001.png"
    assert np.array_equal(np.asarray(ok["image"].convert("RGB")), np.asarray(picture))  # the same pixels
    assert (
        missing["error_code"] == "MISSING_INPUT" and missing["image"] is None and missing["caption"] is None
    )


def test_the_manifest_has_provenance_and_the_rates_plot_and_progress_was_logged(captioned, tiny_model):
    config, summary, out, _, logged = captioned
    manifest = json.loads((out / "_run-hf.json").read_text())
    prov = manifest["provenance"]
    assert prov["config_sha256"] == config_hash(config)
    assert not prov["config_redacted"] and JobConfig.model_validate(prov["config"]) == config  # as it ran
    assert prov["project"]["commit"] and prov["command"]["cwd"]  # this checkout's commit
    assert prov["checkpoint"]["config_sha256"] == file_hash(Path(tiny_model) / "config.json")
    assert set(prov["checkpoint"]["adapters_sha256"]) == {"vision", "speech"}
    assert all(prov["versions"][k] for k in ("phi4mm-batch", "vllm", "ray", "torch", "transformers"))
    assert prov["devices"] == ["cpu"] and len(prov["gpu_actors"]) == 1 and prov["driver"]["host"]
    assert manifest["progress_plot"] == "_run-hf.png"
    assert Image.open(io.BytesIO((out / "_run-hf.png").read_bytes())).format == "PNG"
    lines = [m for m in logged if m.startswith("progress: ")]
    assert lines and lines[-1].startswith("progress: ") and "/2 rows" in lines[-1], logged
