"""Prompt-token arithmetic for Phi-4-multimodal, identical to what vLLM's Phi4MM processor computes.

An image placeholder expands to a number of tokens that depends only on the image's size and dynamic_hd
(``Phi4MMProcessingInfo._compute_num_image_tokens``); an audio placeholder to a number that depends only
on the clip's length at 16 kHz (``get_audio_num_frames`` + ``_compute_audio_embed_size``). Computing
both here lets the CPU stage reject over-long rows before they reach a GPU.
"""

from __future__ import annotations

import math

from schemas.model import PHI4MM


def find_closest_aspect_ratio(
    aspect_ratio: float, target_ratios: list[tuple[int, int]], width: int, height: int, image_size: int
) -> tuple[int, int]:
    """The original Phi-4-mm image processor's rule; ties prefer the larger grid when the image is big enough."""
    best_ratio_diff = float("inf")
    best_ratio = (1, 1)
    area = width * height
    for ratio in target_ratios:
        ratio_diff = abs(aspect_ratio - ratio[0] / ratio[1])
        if ratio_diff < best_ratio_diff:
            best_ratio_diff = ratio_diff
            best_ratio = ratio
        elif ratio_diff == best_ratio_diff and area > 0.5 * image_size * image_size * ratio[0] * ratio[1]:
            best_ratio = ratio
    return best_ratio


def crop_grid(width: int, height: int, dynamic_hd: int) -> tuple[int, int]:
    """(columns, rows) of 448-px HD crops the image is resized and padded to."""
    size = PHI4MM.crop_size
    cols, rows = math.ceil(width / size), math.ceil(height / size)
    if cols * rows <= dynamic_hd:
        return cols, rows
    ratios = sorted(
        {(i, j) for i in range(1, dynamic_hd + 1) for j in range(1, dynamic_hd + 1) if i * j <= dynamic_hd},
        key=lambda r: r[0] * r[1],
    )
    return find_closest_aspect_ratio(width / height, ratios, width, height, size)


def fitted_size(width: int, height: int, dynamic_hd: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """((canvas_w, canvas_h), (resized_w, resized_h)): the crop grid's size and the aspect-preserving
    size the image is resized to inside it, by the original processor's arithmetic (int() truncation)."""
    cols, rows = crop_grid(width, height, dynamic_hd)
    target_w, target_h = PHI4MM.crop_size * cols, PHI4MM.crop_size * rows
    if target_w / width < target_h / height:
        resized = (target_w, int(height * (target_w / width)))
    else:
        resized = (int(width * (target_h / height)), target_h)
    return (target_w, target_h), resized


def letterbox_size(width: int, height: int, dynamic_hd: int) -> tuple[int, int]:
    """The smallest (width, height), padding only the short side, whose fit to its crop grid keeps every
    side at least ``PHI4MM.min_resized_side`` px (the original processor refuses less); the size itself
    when it already does."""

    def fits(short: int) -> bool:
        size = (width, short) if width >= height else (short, height)
        return min(fitted_size(*size, dynamic_hd)[1]) >= PHI4MM.min_resized_side

    long, short = max(width, height), min(width, height)
    if fits(short):
        return width, height
    low, high = short, long  # a square always fits
    while high - low > 1:  # bisection over the padded short side; fits() is cheap arithmetic
        mid = (low + high) // 2
        low, high = (low, mid) if fits(mid) else (mid, high)
    return (width, high) if width >= height else (high, height)


def num_image_tokens(width: int, height: int, dynamic_hd: int) -> int:
    """Tokens one ``<|image_n|>`` placeholder expands to: global view + separator + HD crops + newlines."""
    size, patch, comp = PHI4MM.crop_size, PHI4MM.patch_size, PHI4MM.token_compression
    (target_w, target_h), (new_w, new_h) = fitted_size(width, height, dynamic_hd)
    pad_w, pad_h = target_w - new_w, target_h - new_h  # padding left after the aspect-preserving resize
    feat_w, feat_h = target_w // patch, target_h // patch
    if pad_w >= patch:
        feat_w -= pad_w // patch
    elif pad_h >= patch:
        feat_h -= pad_h // patch
    hd_w, hd_h = math.ceil(feat_w / comp), math.ceil(feat_h / comp)
    global_side = size // patch // comp
    return global_side * global_side + 1 + hd_w * hd_h + hd_h + global_side


def num_audio_frames(num_samples_16k: int) -> int:
    """Log-mel frames of a 16 kHz clip (25 ms window, 10 ms hop); 0 when shorter than one window."""
    return max(0, (num_samples_16k - PHI4MM.audio_window) // PHI4MM.audio_hop + 1)


def num_audio_tokens(num_samples_16k: int) -> int:
    """Tokens one ``<|audio_n|>`` placeholder expands to for a clip of this many 16 kHz samples."""
    return audio_tokens_for_frames(num_audio_frames(num_samples_16k))


def audio_tokens_for_frames(frames: int) -> int:
    """Tokens the audio encoder emits for this many log-mel frames."""
    tokens = math.ceil(frames / PHI4MM.audio_compression_rate)
    return math.ceil(tokens / PHI4MM.audio_qformer_compression_rate)
