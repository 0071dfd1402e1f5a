"""The same rows through both engines, with the same weights: vLLM on the original layout, transformers on
its own layout of the same tiny model.

The two tiny checkpoints share their tokenizer and LoRA adapters (the same files); their language models
are made equal here: vLLM's loader for ``load_format: dummy`` is wrapped to load the transformers
checkpoint's saved random weights after its own. Their media towers differ (vLLM hard-codes SigLIP, shrunk for speed;
the transformers checkpoint has its own tiny towers), so answers are compared on text rows only.

What this states: on the same prepared rows both engines count every row's prompt tokens alike, the
CPU stage's count; and with greedy decoding their first generated tokens are the same on every text
row, base and both adapters (float32 on the CPU: the next three tokens too, here; the texts differ
only in a leading space from vLLM's detokenizer)."""

import pyarrow as pa
import pytest
import torch

from actors.engines.contract import EngineRequest
from actors.generate import GenerateRows
from actors.preprocess import PreprocessRows
from jobs.make_sample_data import SCHEMA, sample_rows
from tests.helpers import make_config

MAX_TOKENS = 4


@pytest.fixture(scope="module")
def configs(tiny_model, tiny_transformers_model, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("parity")
    common = {"sampling": {"max_tokens": MAX_TOKENS, "temperature": 0.0}}
    vllm = make_config(tiny_model, tmp, engine={"init_hook": "jobs.tiny_vision:shrink_siglip"}, **common)
    transformers = make_config(
        tiny_transformers_model,
        tmp,
        engine={"backend": "transformers"},
        model={"load_format": "auto"},
        **common,
    )
    return vllm, transformers


@pytest.fixture(scope="module")
def prepared(configs):
    """The sample rows prepared once by the CPU stage, the same inputs for both engines."""
    table = pa.Table.from_pylist(sample_rows(), schema=SCHEMA)
    rows = PreprocessRows(configs[0])(table).to_pylist()
    return [row for row in rows if row["status"] == "ok"]


@pytest.fixture(scope="module")
def engines(configs, tiny_transformers_model):
    from vllm.model_executor.model_loader.dummy_loader import DummyModelLoader

    weights = language_model_weights(tiny_transformers_model)
    random_weights = DummyModelLoader.load_weights

    def load_weights(self, model, model_config):  # vLLM's random weights, then the shared ones
        random_weights(self, model, model_config)
        copied = 0
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name in weights:
                    param.copy_(weights[name])
                    copied += 1
        assert copied == len(weights), f"copied {copied} of {len(weights)} language-model tensors"

    with pytest.MonkeyPatch.context() as patch:  # the engine is built in this process (integration conftest)
        patch.setattr(DummyModelLoader, "load_weights", load_weights)
        vllm = GenerateRows(configs[0], run_id="parity").engine
    return vllm, GenerateRows(configs[1], run_id="parity").engine


def language_model_weights(checkpoint: str) -> dict:
    """The transformers checkpoint's language model (embeddings, decoder layers, final norm; the head is
    tied), by the names vLLM's Phi4MM gives the same tensors before its CPU backend packs them."""
    from safetensors.torch import load_file

    saved = load_file(f"{checkpoint}/model.safetensors")
    return {k: v for k, v in saved.items() if k.startswith("model.") and "embed_tokens_extend" not in k}


def test_both_engines_count_every_rows_prompt_tokens_as_the_cpu_stage(engines, prepared):
    requests = [r for row in prepared for r in EngineRequest.from_prepared(row)]
    assert {r.images != [] for r in requests} == {True, False} and any(r.audios for r in requests)
    vllm, transformers = (engine.generate(requests) for engine in engines)
    assert all(r.error is None for r in vllm + transformers)
    assert [r.prompt_tokens for r in vllm] == [r.prompt_tokens for r in transformers]
    assert [r.prompt_tokens for r in vllm] == [row["prompt_tokens"] for row in prepared]


def test_greedy_first_tokens_agree_on_text_rows_with_each_adapter(engines):
    prompts = [
        "<|user|>tell me about the world<|end|><|assistant|>",
        "<|user|>what is this picture<|end|><|assistant|>",
        "<|system|>you are helpful<|end|><|user|>say hello<|end|><|assistant|>",
    ]
    requests = [EngineRequest(prompt=p, adapter=a) for p in prompts for a in (None, "vision", "speech")]
    vllm, transformers = (engine.generate(requests) for engine in engines)
    assert len({r.text for r in vllm}) > 3  # the rows differ: the comparison can fail
    first = [(a.text.split()[:1], b.text.split()[:1]) for a, b in zip(vllm, transformers, strict=True)]
    assert all(a == b for a, b in first), first
    # the whole answers too; vLLM's incremental detokenizer puts the tiny word-level tokenizer's separator
    # before the first word, transformers' decode does not (a real BPE vocabulary carries its own spaces)
    assert [r.text.strip() for r in vllm] == [r.text.strip() for r in transformers]
    assert [r.completion_tokens for r in vllm] == [r.completion_tokens for r in transformers]
