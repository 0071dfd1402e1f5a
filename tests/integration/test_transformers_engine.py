"""The transformers backend (actors/engines/transformers/engine.py) on its tiny checkpoint, in this process:
what the pipeline test cannot show. Adapters really change the computation and a batch grouped by
adapter gives each row what it gets alone; one rejected request does not sink its batch; stop strings,
seeds and per-row max_tokens; audio beside an image gets the vision-speech projection."""

import pytest

from actors.engines.contract import EngineRequest
from actors.generate import GenerateRows
from actors.preprocess import PreprocessRows
from schemas.sampling import RowSampling
from tests.helpers import MEDIA, make_config, media_table

PROMPT = "<|user|>tell me about the world<|end|><|assistant|>"


@pytest.fixture(scope="module")
def config(tiny_transformers_model, tmp_path_factory):
    return make_config(
        tiny_transformers_model,
        tmp_path_factory.mktemp("transformers"),
        engine={"backend": "transformers"},
        model={"load_format": "auto"},
        sampling={"max_tokens": 6},
    )


@pytest.fixture(scope="module")
def engine(config):
    return GenerateRows(config, run_id="contract").engine


def test_adapters_change_the_answer_and_a_grouped_batch_matches_single_requests(engine):
    requests = [EngineRequest(prompt=PROMPT, adapter=a) for a in (None, "vision", "speech")]
    alone = [engine.generate([r])[0] for r in requests]
    assert len({r.text for r in alone}) == 3
    before = engine.stats()["requests"]
    mixed = engine.generate(requests * 2)
    assert [r.text for r in mixed] == [r.text for r in alone] * 2
    assert engine.stats()["requests"] - before == 6 and engine.stats()["max_in_flight"] >= 2


def test_a_rejected_request_does_not_sink_its_neighbours(engine):
    good = EngineRequest(prompt=PROMPT)
    bad = EngineRequest(prompt="<|user|>" + "hello " * 5000 + "<|end|><|assistant|>")
    results = engine.generate([good, bad, good])
    assert [r.error is None for r in results] == [True, False, True]
    assert "maximum context length" in results[1].error
    assert results[0].text == results[2].text and results[0].completion_tokens == 6


def test_per_row_sampling_max_tokens_stop_and_seed(engine):
    # the tiny base model's greedy answer is mostly special tokens (empty text); an adapter's has words
    free, short = engine.generate(
        [EngineRequest(prompt=PROMPT, adapter="vision", sampling=RowSampling(max_tokens=12)),
         EngineRequest(prompt=PROMPT, adapter="vision", sampling=RowSampling(max_tokens=3))]
    )  # fmt: skip
    assert (free.completion_tokens, short.completion_tokens) == (12, 3) and free.finish_reason == "length"
    assert free.text.startswith(short.text)  # greedy: the shorter is a prefix, in one padded batch
    words = free.text.split()
    assert len(words) >= 3, free.text
    stop = words[2]
    (stopped,) = engine.generate(
        [EngineRequest(prompt=PROMPT, adapter="vision", sampling=RowSampling(max_tokens=12, stop=[stop]))]
    )
    assert stopped.finish_reason == "stop" and stopped.completion_tokens < 12
    assert stop not in stopped.text and free.text.startswith(stopped.text)
    seeded = EngineRequest(
        prompt=PROMPT, adapter="vision", sampling=RowSampling(temperature=1.0, seed=11, max_tokens=12)
    )
    first, second = engine.generate([seeded]), engine.generate([seeded])
    other = engine.generate(
        [seeded.model_copy(update={"sampling": RowSampling(temperature=1.0, seed=12, max_tokens=12)})]
    )
    assert first[0].text == second[0].text != other[0].text


def test_audio_beside_an_image_gets_the_vision_speech_projection(config, engine):
    modes, handles = [], []
    audio_embed = engine.model.model.embed_tokens_extend.audio_embed
    handles.append(
        audio_embed.register_forward_pre_hook(
            lambda m, args, kwargs: modes.append(kwargs["audio_projection_mode"]), with_kwargs=True
        )
    )
    audio = {"bytes": (MEDIA / "fox.wav").read_bytes(), "path": None}
    rows = [
        {"id": "both", "image": {"bytes": (MEDIA / "cat.jpg").read_bytes(), "path": None}, "audio": audio, "prompt": None},
        {"id": "audio", "image": None, "audio": audio, "prompt": None},
    ]  # fmt: skip
    prepared = PreprocessRows(config)(media_table(rows)).to_pylist()
    try:
        results = engine.generate([r for row in prepared for r in EngineRequest.from_prepared(row)])
    finally:
        for h in handles:
            h.remove()
    assert sorted(modes) == ["speech", "vision"]  # two batches: one per adapter
    assert [r.prompt_tokens for r in results] == [row["prompt_tokens"] for row in prepared]


def test_a_batch_with_a_clip_over_the_encoders_40_s_window_runs_as_one_batch(config, engine):
    # transformers' own unfold_tensor failed such batches (actors/engines/transformers/patches.py)
    import io

    import numpy as np
    import soundfile as sf

    def clip(seconds: float) -> dict:
        tone = 0.3 * np.sin(np.arange(int(seconds * 16000)) * 2 * np.pi * 220 / 16000).astype(np.float32)
        buffer = io.BytesIO()
        sf.write(buffer, tone, 16000, format="WAV")
        return {"bytes": buffer.getvalue(), "path": None}

    rows = [{"id": s, "image": None, "audio": clip(float(s)), "prompt": None} for s in ("45", "5")]
    prepared = PreprocessRows(config)(media_table(rows)).to_pylist()
    assert [row["status"] for row in prepared] == ["ok", "ok"]
    requests = [r for row in prepared for r in EngineRequest.from_prepared(row)]
    split_before = engine.stats()["split_batches"]
    batched = engine.generate(requests)
    assert engine.stats()["split_batches"] == split_before  # no fallback to one request at a time
    alone = [engine.generate([r])[0] for r in requests]
    assert [r.error for r in batched] == [None, None]
    assert [r.prompt_tokens for r in batched] == [row["prompt_tokens"] for row in prepared]
    assert [r.completion_tokens for r in batched] == [r.completion_tokens for r in alone]
