import numpy as np
import pytest

from actors.media.chunks import chunk_waveform, stitch_texts

SR = 16000


def test_short_clip_is_one_window():
    x = np.zeros(10 * SR, np.float32)
    assert [len(c) for c in chunk_waveform(x, 30, 1)] == [10 * SR]


def test_windows_overlap_and_cover_the_clip():
    x = np.arange(95 * SR, dtype=np.float32)
    windows = chunk_waveform(x, 30, 2)
    assert [len(w) for w in windows[:-1]] == [30 * SR] * (len(windows) - 1)
    for prev, nxt in zip(windows, windows[1:], strict=False):
        assert prev[-1] >= nxt[0]  # overlap
        assert nxt[0] == prev[-2 * SR]  # exactly 2 s of overlap
    assert windows[0][0] == 0 and windows[-1][-1] == x[-1]


@pytest.mark.parametrize("seconds", [30.5, 31.2, 60.0, 61.5, 89.9])
def test_no_tiny_tail_window(seconds):
    x = np.arange(int(seconds * SR), dtype=np.float32)
    windows = chunk_waveform(x, 30, 1)
    assert windows[-1][-1] == x[-1]
    assert len(windows[-1]) >= 1 * SR + 1 * SR or len(windows) == 1


def test_stitch_drops_repeated_overlap_words():
    assert stitch_texts(["the quick brown fox", "Fox jumps over", "over the lazy dog."]) == (
        "the quick brown fox jumps over the lazy dog."
    )
    assert stitch_texts(["hello", "world"]) == "hello world"
    assert stitch_texts(["", "a b"]) == "a b"
