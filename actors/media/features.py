"""Phi-4-multimodal's model inputs, computed in the CPU stage instead of in the GPU actor.

The checkpoint's own processor (Microsoft's ``processing_phi4mm.py``, ported to transformers as
``Phi4MultimodalImageProcessor`` / ``Phi4MultimodalFeatureExtractor``) turns media into:
- per image: the picture resized (bilinear) into its grid of 448 px crops and padded with white, then
  scaled to [-1, 1], cut into crops behind a bicubic 448 px global view, plus a 32x32 patch mask per crop;
- per audio clip: 80-channel log-mel frames (25 ms window, 10 ms hop, in-frame pre-emphasis).

Here the expensive, pixel-by-pixel parts run on CPU actors: the image resize and pad (kept as uint8, the
smallest exact form, ~1/4 of float crops) and the whole log-mel computation. What is left of the image
steps (scale, crop, global view) is a few tensor ops that ``actors.engines.vllm.phi4mm`` runs on the GPU, with
the original's float arithmetic (bit-exact on a CPU; on an H100 within 5e-4 of it, bench/preprocess.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from typing import TYPE_CHECKING

import numpy as np

from actors.tokens import fitted_size, num_audio_frames
from schemas.model import PHI4MM
from schemas.rows import ErrorCode, RowError

if TYPE_CHECKING:
    import torch

MASK_SIDE = PHI4MM.crop_size // PHI4MM.patch_size  # 32 patches per crop side


@dataclass(frozen=True)
class ImageCanvas:
    """One image as the engine takes it from the CPU stage."""

    # (rows*448, cols*448, 3) uint8: resized into the crop grid, white padding right/bottom
    pixels: np.ndarray
    mask: np.ndarray  # (1 + rows*cols, 32, 32) uint8: global view first; 1 = the patch shows image
    num_tokens: int  # placeholder tokens the image takes in the prompt (from the mask, as the model counts)

    @property
    def crops(self) -> int:
        return self.mask.shape[0]


def crop_masks(canvas: tuple[int, int], resized: tuple[int, int]) -> np.ndarray:
    """Patch masks of the global view and every crop: padding patches (whole 14 px steps) are 0."""
    (target_w, target_h), (new_w, new_h) = canvas, resized
    patch = PHI4MM.patch_size
    full = np.ones((target_h // patch, target_w // patch), np.uint8)
    pad_w, pad_h = target_w - new_w, target_h - new_h
    if pad_w >= patch:
        full[:, full.shape[1] - pad_w // patch :] = 0
    if pad_h >= patch:
        full[full.shape[0] - pad_h // patch :, :] = 0
    rows, cols = target_h // PHI4MM.crop_size, target_w // PHI4MM.crop_size
    crops = (
        full.reshape(rows, MASK_SIDE, cols, MASK_SIDE).transpose(0, 2, 1, 3).reshape(-1, MASK_SIDE, MASK_SIDE)
    )
    return np.concatenate([np.ones((1, MASK_SIDE, MASK_SIDE), np.uint8), crops])


def tokens_from_masks(mask: np.ndarray, canvas: tuple[int, int]) -> int:
    """Placeholder tokens the vision tower emits for these masks: 16x16 global + separator + the 2x2-pooled
    valid HD patches + one newline per pooled row (the original processor's ``num_img_tokens``)."""
    target_w, target_h = canvas
    rows, cols = target_h // PHI4MM.crop_size, target_w // PHI4MM.crop_size
    pooled = mask[1:, 0::2, 0::2]  # (crops, 16, 16)
    side = pooled.shape[-1]
    grid = pooled.reshape(rows, cols, side, side).transpose(0, 2, 1, 3).reshape(rows * side, cols * side)
    global_side = MASK_SIDE // PHI4MM.token_compression
    return global_side * global_side + 1 + int(grid.sum()) + int(grid[:, 0].sum()) + global_side


def image_canvas(image, dynamic_hd: int, where: str = "", size: tuple[int, int] | None = None) -> ImageCanvas:
    """An RGB PIL image -> its canvas: the original processor's resize (PIL bilinear) and white padding.
    ``size``: the size the picture counts as when it differs from ``image.size`` (a reduced-scale decode
    or a downscale): it decides the crop grid; the pixels are resampled from what ``image`` holds."""
    from PIL import Image

    width, height = size or image.size
    canvas, resized = fitted_size(width, height, dynamic_hd)
    if min(resized) < PHI4MM.min_resized_side:
        raise RowError(
            ErrorCode.IMAGE_ASPECT_RATIO_UNSUPPORTED,
            f"image {where} is {width}x{height}; fitted to its {canvas[0]}x{canvas[1]} crop grid it "
            f"would be {resized[0]}x{resized[1]} px, and Phi-4-multimodal's processor needs at least "
            f"{PHI4MM.min_resized_side} px per side. Crop or pad it to a less extreme aspect ratio.",
        )
    pixels = np.full((canvas[1], canvas[0], 3), 255, np.uint8)
    pixels[: resized[1], : resized[0]] = np.asarray(
        image if image.size == resized else image.resize(resized, Image.BILINEAR)
    )
    mask = crop_masks(canvas, resized)
    return ImageCanvas(pixels=pixels, mask=mask, num_tokens=tokens_from_masks(mask, canvas))


def tensor_view(data, dtype: str, shape: tuple[int, ...]) -> torch.Tensor:
    """A prepared blob (bytes or a zero-copy ``pyarrow.Buffer`` slice) as a CPU tensor, without copying:
    a read-only view of the Arrow bytes, which the engines never write to."""
    import warnings

    import torch

    with warnings.catch_warnings():  # torch warns that the numpy array is not writable
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(np.frombuffer(data, dtype=dtype).reshape(shape))


def crops_from_canvas(canvas: torch.Tensor) -> torch.Tensor:
    """(H, W, 3) uint8 canvas -> (1 + crops, 3, 448, 448) float32: the global view, then the crops row by
    row, with the original processor's arithmetic (ToTensor, Normalize(0.5, 0.5), bicubic interpolate)."""
    import torch
    import torch.nn.functional as F

    size = PHI4MM.crop_size
    x = canvas.permute(2, 0, 1).float().div(255).sub(PHI4MM.pixel_mean).div(PHI4MM.pixel_std)
    global_view = F.interpolate(x[None], size=(size, size), mode="bicubic")
    rows, cols = x.shape[1] // size, x.shape[2] // size
    crops = x.reshape(3, rows, size, cols, size).permute(1, 3, 0, 2, 4).reshape(-1, 3, size, size)
    return torch.cat([global_view, crops])


@cache
def _mel_filters() -> np.ndarray:
    """(257, 80) float32: triangles in Kaldi mel space from 0 to 7690 Hz, the checkpoint's filterbank."""
    from transformers.audio_utils import mel_filter_bank

    return mel_filter_bank(
        num_frequency_bins=PHI4MM.audio_n_fft // 2 + 1,
        num_mel_filters=PHI4MM.audio_mel_bins,
        min_frequency=0.0,
        max_frequency=PHI4MM.audio_mel_max_hz,
        sampling_rate=PHI4MM.audio_sample_rate,
        triangularize_in_mel_space=True,
        mel_scale="kaldi",
    ).astype(np.float32)


@cache
def _scaled_window() -> np.ndarray:
    # the original multiplies frames by 32768 and then by a (symmetric) Hamming window: one product here
    return (np.hamming(PHI4MM.audio_window) * PHI4MM.audio_pcm_scale).astype(np.float32)


def log_mel(samples: np.ndarray) -> np.ndarray:
    """(frames, 80) float32 log-mel features of a 16 kHz mono clip, as the checkpoint's feature extractor
    computes them (in float32 and with a float32 FFT, so within ~1e-4 of its float64 arithmetic)."""
    from scipy import fft

    win, hop = PHI4MM.audio_window, PHI4MM.audio_hop
    n = num_audio_frames(len(samples))
    if n < 1:
        return np.zeros((0, PHI4MM.audio_mel_bins), np.float32)
    x = np.ascontiguousarray(samples, dtype=np.float32)
    frames = np.lib.stride_tricks.as_strided(x, shape=(n, win), strides=(hop * 4, 4), writeable=False)
    # pre-emphasis inside each frame; the first sample's "previous" sample is itself
    y = np.empty((n, win), np.float32)
    np.multiply(frames[:, :-1], -PHI4MM.audio_preemphasis, out=y[:, 1:])
    y[:, 1:] += frames[:, 1:]
    np.multiply(frames[:, 0], 1.0 - PHI4MM.audio_preemphasis, out=y[:, 0])
    y *= _scaled_window()
    spec = fft.rfft(y, n=PHI4MM.audio_n_fft, axis=1, workers=1)
    power = np.square(spec.real) + np.square(spec.imag)
    mel = power @ _mel_filters()
    np.maximum(mel, 1.0, out=mel)
    return np.log(mel, out=mel)
