"""The GPU stage on the real vLLM CPU engine (in this process, SigLIP tower shrunk by the project's
``jobs.tiny_vision`` hook; tests/integration/test_jobs_run.py runs the unmodified tower).

What a stand-in engine cannot show: vLLM's own prompt_token_ids length equals the CPU stage's count,
adapters really change the computation, one rejected request does not sink its batch, seeds repeat."""

import io

import numpy as np
import pyarrow as pa
import pytest
import soundfile as sf
from PIL import Image

from actors.engines.contract import EngineRequest
from actors.engines.vllm.engine import engine_prompt
from actors.generate import GenerateRows
from actors.preprocess import PreprocessRows
from schemas.rows import MEDIA_STRUCT
from schemas.sampling import RowSampling
from tests.helpers import MEDIA, assert_adapters_apply_per_row_in_shared_steps, make_config

DYNAMIC_HD = 2


@pytest.fixture(scope="module")
def config(tiny_model, tmp_path_factory):
    return make_config(
        tiny_model,
        tmp_path_factory.mktemp("engine"),
        engine={
            "dynamic_hd": DYNAMIC_HD,
            "init_hook": "jobs.tiny_vision:shrink_siglip",
            "max_model_len": 4096,
        },
        sampling={"max_tokens": 6},
    )


@pytest.fixture(scope="module")
def generate(config):
    return GenerateRows(config, run_id="contract")


def _png(w, h, seed) -> bytes:
    rgb = (np.random.default_rng(seed).random((h, w, 3)) * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return buf.getvalue()


def _wav(seconds, rate, seed) -> bytes:
    buf = io.BytesIO()
    sf.write(
        buf,
        np.random.default_rng(seed).normal(0, 0.1, int(seconds * rate)).astype(np.float32),
        rate,
        format="WAV",
    )
    return buf.getvalue()


def _rows():
    sizes = [(1, 1), (640, 300), (300, 900), (1500, 40), (40, 1500), (449, 448), (1000, 1000)]
    rows = [{"id": f"img-{w}x{h}", "image": {"bytes": _png(w, h, i), "path": None}, "audio": None, "prompt": None}
            for i, (w, h) in enumerate(sizes)]  # fmt: skip
    for i, (sec, rate) in enumerate([(0.03, 16000), (1.7, 8000), (3.2, 22050), (2.0, 48000)]):
        rows.append({"id": f"aud-{sec}s-{rate}", "image": None, "audio": {"bytes": _wav(sec, rate, i), "path": None},
                     "prompt": "transcribe <|audio_1|> please"})  # fmt: skip
    rows.append({"id": "both", "image": {"bytes": (MEDIA / "cat.jpg").read_bytes(), "path": None},
                 "audio": {"bytes": (MEDIA / "question.flac").read_bytes(), "path": None}, "prompt": None})  # fmt: skip
    rows.append({"id": "text", "image": None, "audio": None, "prompt": "hello <|image_1|> world"})
    schema = pa.schema(
        [("id", pa.string()), ("image", MEDIA_STRUCT), ("audio", MEDIA_STRUCT), ("prompt", pa.string())]
    )
    return pa.Table.from_pylist(rows, schema=schema)


def test_prompt_tokens_equal_vllm_prompt_token_ids(config, generate):
    prepared = PreprocessRows(config)(_rows())
    assert set(prepared.column("status").to_pylist()) == {"ok"}
    out = generate(prepared).to_pylist()
    ours = prepared.column("prompt_tokens").to_pylist()
    theirs = [r["prompt_tokens"] for r in out]  # len(RequestOutput.prompt_token_ids)
    assert [r["status"] for r in out] == ["ok"] * len(out)
    assert theirs == ours
    assert [r["adapter"] for r in out] == ["vision"] * 7 + ["speech"] * 4 + ["vision", None]
    assert all(r["completion_tokens"] == 6 and r["finish_reason"] == "length" for r in out)


def test_a_special_token_split_over_two_cells_counts_as_its_defused_control(tiny_model, tmp_path, generate):
    """vLLM counts an injected row's prompt as the CPU stage does, and as the control without the pipes."""
    split = [("<|image", "_1|>"), ("<|audio_", "1|>"), ("<|en", "d|>")]
    rows = [{"id": "x", "a": a, "b": b} for a, b in split]
    rows += [{"id": "control", "a": a.replace("|", ""), "b": b.replace("|", "")} for a, b in split]
    task = make_config(tiny_model, tmp_path, task={"preset": "custom", "template": "Q {a}{b}"})
    prepared = PreprocessRows(task)(pa.Table.from_pylist(rows)).to_pylist()
    results = generate.engine.generate([EngineRequest(prompt=r["prompt"]) for r in prepared])
    assert [r.error for r in results] == [None] * len(rows)
    theirs = [r.prompt_tokens for r in results]
    assert theirs == [r["prompt_tokens"] for r in prepared] and theirs[:3] == theirs[3:]


def test_adapters_change_the_computation_and_mixed_batches_match_single_requests(config, generate):
    assert_adapters_apply_per_row_in_shared_steps(generate.engine, max_steps=config.sampling.max_tokens)


def test_a_rejected_request_does_not_sink_its_neighbours(generate):
    good = EngineRequest(prompt="<|user|>hello<|end|><|assistant|>")
    # Longer than max_model_len: vLLM rejects it at input processing (the CPU stage would have caught it).
    bad = EngineRequest(prompt="<|user|>" + "hello " * 5000 + "<|end|><|assistant|>")
    results = generate.engine.generate([good, bad, good])
    assert [r.error is None for r in results] == [True, False, True]
    assert "maximum context length" in results[1].error
    assert results[0].text == results[2].text and results[0].completion_tokens == 6


def test_seeded_sampling_repeats(generate):
    req = EngineRequest(
        prompt="<|user|>hello world<|end|><|assistant|>",
        sampling=RowSampling(temperature=1.0, seed=11, max_tokens=12),
    )
    first, second = generate.engine.generate([req]), generate.engine.generate([req])
    other = generate.engine.generate(
        [req.model_copy(update={"sampling": req.sampling.model_copy(update={"seed": 12})})]
    )
    assert first[0].text == second[0].text
    assert first[0].text != other[0].text


def test_chunked_long_audio_through_the_engine(config, generate):
    chunking = config.model_copy(
        update={"media": config.media.model_copy(update={"long_audio": "chunk", "chunk_seconds": 4.0})}
    )
    row = {
        "id": "long",
        "image": None,
        "audio": {"bytes": _wav(10.0, 16000, 9), "path": None},
        "prompt": None,
    }
    schema = pa.schema(
        [("id", pa.string()), ("image", MEDIA_STRUCT), ("audio", MEDIA_STRUCT), ("prompt", pa.string())]
    )
    prepared = PreprocessRows(chunking)(pa.Table.from_pylist([row], schema=schema))
    (out,) = generate(prepared).to_pylist()
    assert out["status"] == "ok" and out["audio_chunks"] == 3 and out["adapter"] == "speech"
    assert out["prompt_tokens"] == prepared.column("prompt_tokens")[0].as_py()  # vLLM's sum over windows
    assert out["completion_tokens"] <= 3 * 6 and out["text"]


def test_per_row_stop_strings_end_generation(generate):
    prompt = "<|user|>hello world<|end|><|assistant|>"
    (free,) = generate.engine.generate([EngineRequest(prompt=prompt, sampling=RowSampling(max_tokens=12))])
    first_word = free.text.split()[1] if len(free.text.split()) > 1 else free.text.split()[0]
    (stopped,) = generate.engine.generate(
        [EngineRequest(prompt=prompt, sampling=RowSampling(max_tokens=12, stop=[first_word]))]
    )
    assert stopped.finish_reason == "stop" and stopped.completion_tokens < free.completion_tokens
    assert first_word not in stopped.text


def test_concurrent_batches_share_the_engine(generate):
    """Two batches from two threads (as Ray Data hands a GPU actor with concurrent_batches=2) are in the
    engine at the same time, not one after the other."""
    import threading

    engine = generate.engine
    before = engine.loop.stats.requests
    engine.loop.stats.max_in_flight = 0  # earlier tests' peaks must not count
    batch = [
        EngineRequest(prompt=f"<|user|>hello {i}<|end|><|assistant|>", sampling=RowSampling(max_tokens=48))
        for i in range(4)
    ]
    results = {}
    threads = [
        threading.Thread(target=lambda k=k: results.__setitem__(k, engine.generate(batch))) for k in (0, 1)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert engine.loop.stats.requests - before == 8
    assert engine.loop.stats.max_in_flight >= 8
    assert [r.text for r in results[0]] == [r.text for r in results[1]]  # greedy: same prompts, same texts


def _run_capturing_embeddings(engine, prompt: dict) -> tuple[list[int], list]:
    """Run one request; return its prompt token ids and what the model made of its media: the vision
    tower's image embeddings, and the log-mel features the audio tower was given (forward hooks; the
    engine runs in this process). The audio tower's output is no use here: with dummy weights it
    collapses every input to the same embeddings."""
    from vllm import SamplingParams

    captured, handles = [], []

    def vision_hook(module, args, output):
        captured.extend(o.detach().float().cpu().clone() for o in output)

    def audio_hook(module, args):
        captured.append(args[0].detach().float().cpu().clone())

    def install(model):
        handles.append(model.vision_encoder.register_forward_hook(vision_hook))
        handles.append(model.embed_tokens_extend.register_forward_pre_hook(audio_hook))

    engine.llm.apply_model(install)
    try:
        params = SamplingParams(max_tokens=1, temperature=0.0)
        out, _, _ = engine.loop.submit(prompt, params).result(timeout=300)
    finally:
        for h in handles:
            h.remove()
    return list(out.prompt_token_ids), captured


def test_prepared_media_reach_the_model_as_its_own_processing_would(config, generate):
    """The CPU stage's canvases and log-mel features against vLLM running the checkpoint's processor on the
    raw media (a PIL image, a 16 kHz waveform): the same prompt tokens and the same embeddings out of the
    vision and audio towers."""
    import soundfile as sf

    from actors.media.decode import decode_image

    engine = generate.engine
    photo = decode_image((MEDIA / "coffee.jpg").read_bytes(), "coffee", 10**8).image.resize((700, 300))
    buf = io.BytesIO()
    photo.save(buf, format="PNG")  # lossless, so the CPU stage decodes exactly these pixels
    speech, _ = sf.read(MEDIA / "fox.wav", dtype="float32")
    rows = [
        {"id": "img", "image": {"bytes": buf.getvalue(), "path": None}, "audio": None, "prompt": "what is this?"},
        {"id": "aud", "image": None, "audio": {"bytes": (MEDIA / "fox.wav").read_bytes(), "path": None},
         "prompt": "transcribe"},
    ]  # fmt: skip
    schema = pa.schema(
        [("id", pa.string()), ("image", MEDIA_STRUCT), ("audio", MEDIA_STRUCT), ("prompt", pa.string())]
    )
    img_row, aud_row = PreprocessRows(config)(pa.Table.from_pylist(rows, schema=schema)).to_pylist()
    (img_req,), (aud_req,) = EngineRequest.from_prepared(img_row), EngineRequest.from_prepared(aud_row)

    raw_ids, raw = _run_capturing_embeddings(
        engine, {"prompt": img_row["prompt"], "multi_modal_data": {"image": photo}}
    )
    ids, ours = _run_capturing_embeddings(engine, engine_prompt(img_req))
    assert ids == raw_ids and len(ids) == img_row["prompt_tokens"]
    assert len(ours) == len(raw) == 1 and torch_equal(ours[0], raw[0])  # bit-identical pixels in, same out
    _, flipped = _run_capturing_embeddings(
        engine,
        {"prompt": img_row["prompt"], "multi_modal_data": {"image": photo.transpose(Image.FLIP_LEFT_RIGHT)}},
    )
    assert not torch_equal(flipped[0], raw[0])  # the comparison can fail: other pixels, other embeddings

    raw_ids, raw = _run_capturing_embeddings(
        engine, {"prompt": aud_row["prompt"], "multi_modal_data": {"audio": (speech, 16000)}}
    )
    ids, ours = _run_capturing_embeddings(engine, engine_prompt(aud_req))
    assert ids == raw_ids and len(ids) == aud_row["prompt_tokens"]
    assert len(ours) == len(raw) == 1 and ours[0].shape == raw[0].shape
    assert float((ours[0] - raw[0]).abs().max()) < 2e-3  # log-mel, float32 against float64: close
    _, reversed_ = _run_capturing_embeddings(
        engine, {"prompt": aud_row["prompt"], "multi_modal_data": {"audio": (speech[::-1].copy(), 16000)}}
    )
    assert float((reversed_[0] - raw[0]).abs().max()) > 1.0


def torch_equal(a, b) -> bool:
    import torch

    return a.shape == b.shape and bool(torch.equal(a, b))


def test_audio_beside_an_image_gets_the_vision_speech_projection(config, generate):
    """The original model projects a clip with its vision-speech projection when the request has images.
    vLLM encodes one modality at a time, so its Phi4MM always picks the speech projection; prepared clips
    carry the row's shape (``audio_with_images``) and get the right one."""
    from vllm import SamplingParams

    engine = generate.engine
    modes, handles = [], []

    def hook(module, args, kwargs, output):
        modes.append(kwargs.get("audio_projection_mode"))

    engine.llm.apply_model(
        lambda m: handles.append(m.embed_tokens_extend.register_forward_hook(hook, with_kwargs=True))
    )
    # a clip no other test sends: the engine reuses a clip's encoder output by its cache key
    audio = {"bytes": _wav(1.5, 16000, 123), "path": None}
    rows = [
        {"id": "both", "image": {"bytes": (MEDIA / "cat.jpg").read_bytes(), "path": None}, "audio": audio, "prompt": None},
        {"id": "audio", "image": None, "audio": audio, "prompt": None},
    ]  # fmt: skip
    schema = pa.schema(
        [("id", pa.string()), ("image", MEDIA_STRUCT), ("audio", MEDIA_STRUCT), ("prompt", pa.string())]
    )
    params = SamplingParams(max_tokens=1, temperature=0.0)
    try:
        for row in PreprocessRows(config)(pa.Table.from_pylist(rows, schema=schema)).to_pylist():
            modes.append(row["id"])
            (request,) = EngineRequest.from_prepared(row)
            engine.loop.submit(engine_prompt(request), params).result(timeout=300)
    finally:
        for h in handles:
            h.remove()
    assert modes == ["both", "vision", "audio", "speech"]


def test_an_image_shared_by_rows_is_encoded_once(config, generate):
    """Rows asking different questions about one image reuse its encoder output (by the cache key the CPU
    stage gives each media item), and a different image is encoded on its own."""
    from vllm import SamplingParams

    engine = generate.engine
    calls, handles = [], []
    engine.llm.apply_model(
        lambda m: handles.append(m.vision_encoder.register_forward_hook(lambda *a: calls.append(1)))
    )
    image = {"bytes": _png(500, 320, 77), "path": None}
    rows = [{"id": str(i), "image": image, "audio": None, "prompt": f"question {i}"} for i in range(3)]
    rows.append(
        {"id": "other", "image": {"bytes": _png(500, 320, 78), "path": None}, "audio": None, "prompt": "q"}
    )
    schema = pa.schema(
        [("id", pa.string()), ("image", MEDIA_STRUCT), ("audio", MEDIA_STRUCT), ("prompt", pa.string())]
    )
    params = SamplingParams(max_tokens=1, temperature=0.0)
    try:
        for row in PreprocessRows(config)(pa.Table.from_pylist(rows, schema=schema)).to_pylist():
            (request,) = EngineRequest.from_prepared(row)
            engine.loop.submit(engine_prompt(request), params).result(timeout=300)
    finally:
        for h in handles:
            h.remove()
    assert len(calls) == 2  # the shared image once, the other image once
