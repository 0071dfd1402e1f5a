"""The engine contract (actors.engines.contract) and the home of the engines, without an engine."""

import importlib
import json
import re
import subprocess
import sys

import pytest

from actors.engines.contract import EngineRequest, effective_sampling
from schemas.job import SamplingConfig
from schemas.rows import empty_prepared_row
from schemas.sampling import RowSampling
from tests.helpers import REPO


def test_the_vllm_plugin_entry_point_names_the_register_function():
    """vLLM loads the plugin by this name in every process it starts (``pip install .`` registers it)."""
    pyproject = (REPO / "pyproject.toml").read_text()
    section = pyproject.split('[project.entry-points."vllm.general_plugins"]\n')[1].split("\n[")[0]
    (spec,) = re.findall(r'^\w+ = "([\w.:]+)"$', section, re.M)
    module, _, name = spec.partition(":")
    from actors.engines.vllm.plugin import register

    assert getattr(importlib.import_module(module), name) is register


@pytest.mark.parametrize(
    ("backend", "missing", "extra"),
    [("transformers", "torch", "'phi4mm-batch[transformers]'"), ("vllm", "vllm", "'phi4mm-batch[gpu]'")],
)
def test_a_backends_missing_package_names_the_extra_that_installs_it(backend, missing, extra):
    """In a fresh interpreter where ``missing`` cannot be imported (None in sys.modules)."""
    script = f"""
import sys
sys.modules[{missing!r}] = None
from actors.engines import build_engine
from schemas.job import EngineConfig, JobConfig
config = JobConfig.model_construct(engine=EngineConfig(backend={backend!r}))
try:
    build_engine(config)
except ModuleNotFoundError as e:
    print(type(e).__name__, e.name, e)
"""
    out = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.startswith(f"ModuleNotFoundError {missing} engine.backend {backend!r} needs"), out
    assert f"Try pip install {extra}" in out.stdout


def test_a_prepared_row_becomes_requests_with_its_sampling():
    row = empty_prepared_row("a") | {
        "prompt": "<|user|><|audio_1|>t<|end|><|assistant|>",
        "audios": [{"frames": 1}, {"frames": 2}],
        "adapter": "speech",
        "prompt_tokens": 40,
        "max_tokens": 5,
        "stop": ["END"],
    }
    (request,) = EngineRequest.from_prepared(row)
    assert request.sampling == RowSampling(max_tokens=5, stop=["END"]) and request.prompt_tokens == 40
    assert [a["frames"] for a in request.audios] == [1, 2] and request.adapter == "speech"
    windows = EngineRequest.from_prepared(row | {"audio_chunks": 2}, alone=True)
    assert [[a["frames"] for a in w.audios] for w in windows] == [[1], [2]]
    assert all(w.alone and w.prompt_tokens is None for w in windows)


def test_row_overrides_win_over_the_jobs_sampling_and_nulls_do_not():
    defaults = SamplingConfig(max_tokens=64, temperature=0.5, stop=["###"], ignore_eos=True)
    assert effective_sampling(defaults, RowSampling()) == defaults
    merged = effective_sampling(defaults, RowSampling(max_tokens=3, temperature=0.0))
    assert (merged.max_tokens, merged.temperature, merged.stop, merged.ignore_eos) == (3, 0.0, ["###"], True)


@pytest.mark.parametrize(
    "bad",
    [{"max_tokens": 0}, {"top_p": 0}, {"top_p": 1.5}, {"temperature": -1}, {"stop": []}, {"stop": [""]}],
)
def test_row_and_job_sampling_share_their_bounds(bad):
    with pytest.raises(ValueError):
        RowSampling(**bad)
    if bad != {"stop": []}:  # the job may have no stop strings; a row's column gives at least one
        with pytest.raises(ValueError):
            SamplingConfig(**bad)


def test_every_configured_backend_is_a_module_with_an_engine_class():
    """Adding an engine is one folder (actors/engines/<backend>/), one registry entry and one config value."""
    from typing import get_args

    from actors.engines import BACKENDS, engine_class
    from schemas.job import EngineConfig

    backends = get_args(EngineConfig.model_fields["backend"].annotation)
    assert set(backends) == set(BACKENDS) == {"vllm", "transformers"}
    for backend in backends:
        cls = engine_class(backend)
        assert callable(cls.generate) and callable(cls.stats)
    with pytest.raises(ValueError, match="backend"):
        EngineConfig(backend="sglang")


def test_the_transformers_checkpoints_language_model_is_the_original_layouts():
    """The tiny checkpoints of both layouts have the same language model shapes, so weights can be shared
    (tests/integration/test_backend_parity.py)."""
    from transformers import Phi4MultimodalConfig

    from jobs import make_tiny_model
    from jobs.transformers_model import model_config

    ours, original = Phi4MultimodalConfig(**model_config()), make_tiny_model._model_config()
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "rms_norm_eps", "tie_word_embeddings"):  # fmt: skip
        assert getattr(ours, key) == original[key], key
    assert ours.vision_config.image_size == ours.vision_config.crop_size == 448  # the CPU stage's crops
    assert ours.rope_parameters["rope_theta"] == original["rope_theta"]


def test_the_full_size_transformers_checkpoint_is_the_released_architecture(tmp_path):
    """bench/gpu.py's transformers side runs the same released model as its vLLM sides."""
    from transformers import Phi4MultimodalConfig

    from jobs.full_size_model import SPEECH_LORA, released_config
    from jobs.transformers_model import LORA_TARGETS, write_full_size_transformers_checkpoint

    out = write_full_size_transformers_checkpoint(tmp_path / "m", lora_weights=False)
    config, released = Phi4MultimodalConfig.from_pretrained(out), released_config()
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "original_max_position_embeddings", "tie_word_embeddings"):  # fmt: skip
        assert getattr(config, key) == released[key], key
    assert config.rope_parameters["long_factor"] == released["rope_scaling"]["long_factor"]
    assert config.rope_parameters["partial_rotary_factor"] == released["partial_rotary_factor"]
    assert (config.vision_config.hidden_size, config.audio_config.num_blocks) == (
        1152,
        24,
    )  # so400m, conformer
    speech = json.loads((out / "speech-lora" / "adapter_config.json").read_text())
    assert (speech["r"], speech["target_modules"]) == (SPEECH_LORA.r, LORA_TARGETS)
