"""Our prompt-token arithmetic against vLLM's own Phi4MM processing info, over 300 random cases.

``Phi4MMProcessingInfo`` is what vLLM uses to expand each placeholder in ``prompt_token_ids``; this test
builds it exactly as the engine does (from the tiny checkpoint's config and processor) without loading a
model. test_engine_contract.py then checks the whole prompt through the real engine."""

import random

import numpy as np
import pytest

from actors.media.decode import prepare_waveform
from actors.tokens import num_audio_tokens, num_image_tokens

DYNAMIC_HD = (1, 2, 4, 9, 16, 36)


@pytest.fixture(scope="module")
def vllm_info(tiny_model):
    from vllm.config import ModelConfig
    from vllm.multimodal import MULTIMODAL_REGISTRY

    return MULTIMODAL_REGISTRY.create_processor(ModelConfig(model=tiny_model, trust_remote_code=True)).info


def _image_sizes(rng: random.Random, n: int) -> list[tuple[int, int]]:
    fixed = [(1, 1), (8000, 8000), (8000, 1), (1, 8000), (448, 448), (449, 448), (447, 895), (1920, 1080),
             (4000, 20), (20, 4000), (896, 448), (13, 14), (14, 13)]  # fmt: skip
    rand = []
    for _ in range(n - len(fixed)):
        kind = rng.random()
        if kind < 0.3:  # extreme aspect ratios
            long, short = rng.randint(1000, 8000), rng.randint(1, 200)
            rand.append((long, short) if rng.random() < 0.5 else (short, long))
        else:
            rand.append((rng.randint(1, 8000), rng.randint(1, 8000)))
    return fixed + rand


def test_image_tokens_match_vllm(vllm_info):
    rng = random.Random(1234)
    processors = {d: vllm_info.get_hf_processor(dynamic_hd=d) for d in DYNAMIC_HD}
    cases = [(w, h, rng.choice(DYNAMIC_HD)) for w, h in _image_sizes(rng, 240)]
    mismatches = [
        (w, h, d, ours, theirs)
        for w, h, d in cases
        if (ours := num_image_tokens(w, h, d))
        != (theirs := vllm_info.get_num_image_tokens(image_width=w, image_height=h, processor=processors[d]))
    ]
    assert len(cases) >= 200
    assert mismatches == []


def test_audio_tokens_match_vllm(vllm_info):
    rng = np.random.default_rng(7)
    rates = [8000, 11025, 16000, 22050, 44100, 48000]
    cases = 0
    for _ in range(80):
        rate = int(rng.choice(rates))
        seconds = float(rng.choice([0.025, 0.03, 0.1, 1.0, 2.5, 7.3, 30.0, 61.0]))
        wav = np.zeros(int(np.ceil(rate * seconds)), np.float32)
        audio = prepare_waveform(wav, rate, "case", min_seconds=0.025)
        n = len(audio.samples)  # what the GPU stage hands vLLM: 16 kHz samples
        theirs = vllm_info._compute_audio_embed_size(vllm_info.get_audio_num_frames(n, 16000))
        assert num_audio_tokens(n) == theirs, (rate, seconds, n)
        cases += 1
    assert cases == 80
