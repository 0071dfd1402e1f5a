"""Token arithmetic: known values and the invariants of the dynamic-HD formula.

The exact agreement with vLLM's own Phi4MM processing is proven in
tests/integration/test_token_parity.py; these are the fast checks."""

import math

import pytest

from actors.tokens import crop_grid, num_audio_frames, num_audio_tokens, num_image_tokens


def test_known_image_counts():
    # 640x300 at dynamic_hd=1: global 16x16 + 16 newlines + 1 separator + HD 16x8 + 8 newlines
    assert num_image_tokens(640, 300, 1) == 256 + 16 + 1 + 128 + 8
    # a square crop-sized image: one HD crop, no padding
    assert num_image_tokens(448, 448, 1) == 256 + 16 + 1 + 256 + 16


@pytest.mark.parametrize("dynamic_hd", [1, 2, 4, 16, 36])
def test_crop_grid_respects_dynamic_hd(dynamic_hd):
    for w, h in [(1, 1), (448, 448), (1920, 1080), (8000, 100), (100, 8000), (4000, 3000)]:
        cols, rows = crop_grid(w, h, dynamic_hd)
        assert (
            1
            <= cols * rows
            <= max(dynamic_hd, math.ceil(w / 448) * math.ceil(h / 448) if w * h <= 448 * 448 else dynamic_hd)
        )
        assert cols * rows <= dynamic_hd or (cols, rows) == (math.ceil(w / 448), math.ceil(h / 448))


def test_more_crops_never_fewer_tokens():
    for w, h in [(1920, 1080), (3000, 500), (700, 4000)]:
        counts = [num_image_tokens(w, h, d) for d in (1, 2, 4, 9, 16, 36)]
        assert counts == sorted(counts)
        assert counts[0] < counts[-1]


def test_audio_counts():
    assert num_audio_frames(399) == 0
    assert num_audio_frames(400) == 1
    assert num_audio_tokens(3 * 16000) == math.ceil(((48000 - 400) // 160 + 1) / 8) == 38
    assert num_audio_tokens(400) == 1
    assert num_audio_tokens(30 * 16000) == 375
