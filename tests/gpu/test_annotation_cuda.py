"""On CUDA: annotation runs (structured outputs, confidence, the loop stop, several tasks per row, the
job's own adapters) with the CPU tier's own assertions, the engine on the GPU's kernels.

Each test but the adapters' calls its CPU twin (tests/integration/) with a CUDA engine, so both tiers
check the same promises (the adapters' twin reaches an S3 test server; this one reads local folders and
repeats its checks); the tiny checkpoints (byte-level tokenizer where decoding is constrained), eager mode to start
fast. Several engines share the one GPU here, each with a small share of its memory."""

import shutil

import pytest

from actors.engines.contract import EngineRequest
from actors.generate import GenerateRows
from actors.preprocess import PreprocessRows
from schemas.model import PHI4MM
from tests.helpers import cuda_sections, make_config
from tests.integration import test_annotation as annotation
from tests.integration import test_custom_adapters as adapters
from tests.integration import test_multitask as multitask

ENGINE_MEMORY = 0.08  # of the GPU, per in-process engine: the tiny model needs a few GiB of KV cache


@pytest.fixture(scope="module")
def byte_engine(tiny_byte_model, tmp_path_factory):
    config = make_config(tiny_byte_model, tmp_path_factory.mktemp("annotate"), confidence=True,
                         sampling={"max_tokens": 96}, **cuda_sections(ENGINE_MEMORY))  # fmt: skip
    return config, GenerateRows(config, run_id="annotate-cuda").engine


def test_choice_labels_in_the_set_with_their_probabilities_on_cuda(byte_engine, tmp_path):
    annotation.test_choice_example_gives_labels_in_the_set_with_their_probabilities(byte_engine, tmp_path)


def test_json_answers_validated_and_typed_on_cuda(byte_engine, tmp_path):
    annotation.test_json_example_validates_every_answer_and_types_its_column(byte_engine, tmp_path)


def test_several_tasks_per_row_on_cuda(tiny_byte_model, byte_engine, tmp_path):
    # the CPU twin's budget (8 tokens a task) with the shared CUDA engine
    base = make_config(tiny_byte_model, tmp_path, **cuda_sections(ENGINE_MEMORY))
    multitask.test_multitask_yaml_runs_every_task_once_per_row((base, byte_engine[1]), tmp_path)


def test_per_row_structured_outputs_and_looping_rows_through_ray_on_cuda(cuda_ray, tiny_byte_model, tmp_path):
    annotation.run_with_per_row_structured_outputs(tiny_byte_model, tmp_path, **cuda_sections(0.15))


def test_custom_adapters_from_local_folders_on_cuda(tiny_model, tmp_path):
    """A byte copy of the checkpoint's vision-lora/ answers as the checkpoint's; a re-trained speech-lora/
    answers differently, on forced-adapter prompts and on audio rows; text rows (no adapter) stay the same."""
    vision = shutil.copytree(f"{tiny_model}/{PHI4MM.vision_lora_dir}", tmp_path / "vision-copy")
    speech = adapters._retrained(tiny_model, tmp_path / "speech-retrained")
    mine = {"adapters": {"vision": str(vision), "speech": speech}}
    configs = [make_config(tiny_model, tmp_path, **cuda_sections(ENGINE_MEMORY), **extra)
               for extra in ({}, {"model": mine})]  # fmt: skip
    engines = [GenerateRows(c, run_id="adapters-cuda").engine for c in configs]
    forced = [
        [e.generate([EngineRequest(prompt=adapters.PROMPT, adapter=a)])[0].text for a in (None, "vision", "speech")]
        for e in engines
    ]  # fmt: skip
    assert len(set(forced[0])) == 3  # each adapter changes the answer, so equal answers mean equal weights
    assert forced[0][:2] == forced[1][:2] and forced[0][2] != forced[1][2]
    rows = [
        {r["id"]: r for r in GenerateRows(c, "adapters-cuda", engine_factory=lambda _, e=e: e)(
            PreprocessRows(c)(adapters._rows())).to_pylist()}
        for c, e in zip(configs, engines, strict=True)
    ]  # fmt: skip
    assert all(r["status"] == "ok" for out in rows for r in out.values())
    assert [rows[1][k]["adapter"] for k in ("fox", "morning", "text")] == ["speech", "speech", None]
    assert rows[0]["text"]["text"] == rows[1]["text"]["text"]
    assert [rows[0][k]["text"] for k in ("fox", "morning")] != [
        rows[1][k]["text"] for k in ("fox", "morning")
    ]
