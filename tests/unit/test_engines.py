"""The engine contract (actors.engines.contract) and the home of the engines, without an engine."""

import importlib
import re

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
    from actors.engines.vllm_plugin import register

    assert getattr(importlib.import_module(module), name) is register


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
