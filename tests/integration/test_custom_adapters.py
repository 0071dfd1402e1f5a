"""The job's own adapters (model.adapters) on each real engine, and the example YAML through the whole
pipeline on a local Ray with vLLM on the CPU.

The custom vision adapter is a byte copy of the checkpoint's vision-lora/ (local): answers must equal the
checkpoint's. The custom speech adapter is the checkpoint's speech-lora/ with other random weights, on the
S3 test server (copied into the node's cache): answers with it must differ from the checkpoint's, on
forced-adapter text prompts and on audio rows, while text rows (no adapter) stay the same."""

import shutil
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from actors.engines.contract import EngineRequest
from actors.generate import GenerateRows
from actors.preprocess import PreprocessRows
from pipelines.phi4mm import run_pipeline
from pipelines.provenance import tree_hash
from schemas import storage
from schemas.job import JobConfig
from schemas.model import PHI4MM
from tests.helpers import MEDIA, REPO, make_config, media_table

PROMPT = "<|user|>tell me about the world<|end|><|assistant|>"


def _rows() -> pa.Table:
    fox, morning = ({"bytes": (MEDIA / n).read_bytes(), "path": n} for n in ("fox.wav", "morning.mp3"))
    return media_table([
        {"id": "fox", "image": None, "audio": fox, "prompt": None},
        {"id": "morning", "image": None, "audio": morning, "prompt": "What is said?"},
        {"id": "text", "image": None, "audio": None, "prompt": "Name a colour."},
    ])  # fmt: skip


def _retrained(checkpoint: str, out) -> str:
    """The checkpoint's speech-lora/ with other random weights of the same shapes (a 'fine-tune')."""
    import torch
    from safetensors.torch import load_file, save_file

    shutil.copytree(f"{checkpoint}/{PHI4MM.speech_lora_dir}", out)
    weights = load_file(out / "adapter_model.safetensors")
    gen = torch.Generator().manual_seed(7)
    save_file({k: torch.randn(v.shape, generator=gen) * 0.5 for k, v in weights.items()},
              str(out / "adapter_model.safetensors"))  # fmt: skip
    return str(out)


@pytest.fixture(scope="module")
def bucket(s3_endpoint):
    from tests.s3_server import S3Bucket

    b = S3Bucket(*s3_endpoint, name=f"phi4mm-adapters-{uuid.uuid4().hex[:12]}")
    yield b
    b.clean()


def _custom(checkpoint: str, bucket, tmp) -> dict:
    """model.adapters for ``checkpoint``: vision a local byte copy, speech re-trained on the S3 server."""
    vision = shutil.copytree(f"{checkpoint}/{PHI4MM.vision_lora_dir}", tmp / "vision-copy")
    speech = _retrained(checkpoint, tmp / "speech-retrained")
    prefix = f"{tmp.name}/speech"
    for f in sorted((tmp / "speech-retrained").iterdir()):
        bucket.put(f"{prefix}/{f.name}", f.read_bytes())
    return {"vision": str(vision), "speech": bucket.url(prefix) + "/", "cache_dir": str(tmp / "cache"),
            "local_speech": speech}  # fmt: skip


@pytest.fixture(scope="module")
def engines(backend, bucket, tmp_path_factory):
    """(checkpoint's adapters, custom adapters) configs and engines of one backend, in this process."""
    model, sections = backend
    tmp = tmp_path_factory.mktemp("custom")
    custom = _custom(model, bucket, tmp)
    local_speech = custom.pop("local_speech")
    storage.use(bucket.storage)
    mine = {**sections, "model": {**sections.get("model", {}), "adapters": custom}}
    configs = [
        make_config(model, tmp, **s, storage={"s3_endpoint": bucket.endpoint}) for s in (sections, mine)
    ]
    built = [(c, GenerateRows(c, run_id="adapters").engine) for c in configs]
    yield built, local_speech
    storage.use(None)


def test_a_byte_copy_answers_as_the_checkpoint_and_a_retrained_adapter_differently(engines):
    (_, ckpt), (config, mine) = engines[0]
    answers = [
        [e.generate([EngineRequest(prompt=PROMPT, adapter=a)])[0].text for a in (None, "vision", "speech")]
        for e in (ckpt, mine)
    ]
    assert len(set(answers[0])) == 3  # each adapter changes the answer, so equal answers mean equal weights
    assert answers[0][:2] == answers[1][:2]  # no adapter; the vision byte copy
    assert answers[0][2] != answers[1][2]  # the re-trained speech adapter is the one applied


@pytest.fixture(scope="module")
def answers(engines) -> list[dict]:
    """The rows answered in this process by the checkpoint's adapters and by the custom ones: id -> row."""
    out = []
    for c, e in engines[0]:
        generated = GenerateRows(c, run_id="adapters", engine_factory=lambda _, e=e: e)(
            PreprocessRows(c)(_rows())
        )
        out.append({r["id"]: r for r in generated.to_pylist()})
    return out


def test_audio_rows_get_the_custom_speech_adapter_and_text_rows_none(answers):
    out = answers
    assert all(r["status"] == "ok" for rows in out for r in rows.values())
    assert [out[0][k]["adapter"] for k in ("fox", "morning", "text")] == ["speech", "speech", None]
    assert out[0]["text"]["text"] == out[1]["text"]["text"]
    assert [out[0][k]["text"] for k in ("fox", "morning")] != [out[1][k]["text"] for k in ("fox", "morning")]


def test_the_remote_adapter_was_copied_once_into_the_cache(engines):
    (_, _), (config, _) = engines[0]
    cache = config.model.adapters.cache_dir
    (entry,) = Path(cache).iterdir()  # one copy, no partial one beside it
    assert tree_hash(entry) == tree_hash(Path(engines[1]))


def test_the_example_yaml_runs_the_pipeline_with_custom_adapters(
    backend, answers, local_ray, bucket, tmp_path
):
    """On vLLM: the YAML through Ray; the GPU actor fetches the S3 adapter itself and answers as the
    in-process engine with the same adapters did."""
    tiny_model, sections = backend
    if sections["engine"].get("backend") == "transformers":
        pytest.skip("the whole-pipeline run is vLLM's (test_pipeline.py runs both backends)")
    custom = _custom(tiny_model, bucket, tmp_path)
    local_speech = custom.pop("local_speech")
    pq.write_table(_rows(), tmp_path / "in.parquet")
    tiny = make_config(tiny_model, tmp_path, engine={"init_hook": "jobs.tiny_vision:shrink_siglip"})
    config = JobConfig.from_yaml(
        REPO / "jobs" / "configs" / "custom_adapters.yaml",
        {
            "input.path": str(tmp_path / "in.parquet"),
            "input.columns": {"id": "id", "audio": "audio", "image": "image"},
            "output.path": str(tmp_path / "out"),
            "model": tiny.model.model_dump() | {"adapters": custom},
            "engine": tiny.engine.model_dump(),
            "resources": tiny.resources.model_dump(),
            "sampling.max_tokens": tiny.sampling.max_tokens,
            "storage.s3_endpoint": bucket.endpoint,
        },
    )
    summary = run_pipeline(config, run_id="custom")
    rows = {r["id"]: r for r in pq.read_table(config.output.path).to_pylist()}
    assert summary["audit"]["ok"] and {k: r["status"] for k, r in rows.items()} == dict.fromkeys(rows, "ok")
    assert set(rows) == {"fox", "morning", "text"} and rows["fox"]["adapter"] == "speech"
    assert {k: r["text"] for k, r in rows.items()} == {k: r["text"] for k, r in answers[1].items()}
    assert {k: r["text"] for k, r in rows.items()} != {k: r["text"] for k, r in answers[0].items()}
    used = summary["provenance"]["adapters"]
    assert used["speech"]["custom"] and used["speech"]["source"] == custom["speech"]
    assert used["speech"]["sha256"] == tree_hash(Path(local_speech))
    assert used["vision"]["sha256"] == summary["provenance"]["checkpoint"]["adapters_sha256"]["vision"]
    assert used["speech"]["sha256"] != summary["provenance"]["checkpoint"]["adapters_sha256"]["speech"]
