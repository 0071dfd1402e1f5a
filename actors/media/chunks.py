"""Long-audio chunking: split a 16 kHz clip into overlapping windows and stitch the windows' texts.

The overlap keeps words that straddle a boundary whole in at least one window; stitching drops the
words the next window repeats from the end of the text so far.
"""

from __future__ import annotations

import numpy as np

from schemas.model import PHI4MM

MIN_TAIL_SECONDS = 1.0  # a shorter last window is merged into the one before it
MAX_OVERLAP_WORDS = 24


def chunk_waveform(samples: np.ndarray, chunk_seconds: float, overlap_seconds: float) -> list[np.ndarray]:
    """Windows of ``chunk_seconds`` that overlap by ``overlap_seconds``; one window for a short clip."""
    rate = PHI4MM.audio_sample_rate
    size, overlap = int(chunk_seconds * rate), int(overlap_seconds * rate)
    if len(samples) <= size:
        return [samples]
    hop = size - overlap
    starts = list(range(0, len(samples) - overlap, hop))
    if len(starts) > 1 and len(samples) - starts[-1] < MIN_TAIL_SECONDS * rate + overlap:
        starts.pop()  # the previous window absorbs a tail that would be mostly overlap
    bounds = [(s, s + size) for s in starts]
    bounds[-1] = (bounds[-1][0], len(samples))
    return [samples[a:b] for a, b in bounds]


def stitch_texts(texts: list[str]) -> str:
    """Join window transcripts in order, dropping the words a window repeats from the previous one."""
    words: list[str] = []
    for text in texts:
        new = text.split()
        best = 0
        for k in range(min(len(words), len(new), MAX_OVERLAP_WORDS), 0, -1):
            if [w.lower().strip(".,!?;:") for w in words[-k:]] == [
                w.lower().strip(".,!?;:") for w in new[:k]
            ]:
                best = k
                break
        words.extend(new[best:])
    return " ".join(words)
