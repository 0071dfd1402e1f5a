"""The caps on a media item's work, each checked before the work is done: encoded bytes
(``media.max_media_bytes``), a picture's pixels and decoded bytes read from its header
(``media.max_image_pixels``, ``media.max_image_bytes``), a clip's sample rate, duration and decoded samples
read from its header (``media.max_audio_seconds``, ``media.max_audio_samples``). Each raises a
``RowError`` with a stable code and says which setting to change.
"""

from __future__ import annotations

from schemas.model import PHI4MM
from schemas.rows import ErrorCode, RowError


def check_media_size(size: int, max_bytes: int, kind: str, where: str, exact: bool = True) -> None:
    if size > max_bytes:
        amount = f"{size:,} bytes" if exact else f"more than {max_bytes:,} bytes"
        raise RowError(
            ErrorCode.MEDIA_TOO_LARGE,
            f"{kind} {where} is {amount}, over media.max_media_bytes ({max_bytes:,}). Try a smaller or "
            "more compressed file, or raise media.max_media_bytes if the data is trusted.",
        )


def check_image_header(img, where: str, max_pixels: int, max_bytes: int | None) -> None:
    """An opened (not yet decoded) picture's pixels under ``max_pixels`` and its decoded bytes, pixels x
    ``image_bytes_per_pixel``, under ``max_bytes`` (``IMAGE_TOO_LARGE``)."""
    width, height = img.size
    if width * height > max_pixels:
        raise RowError(
            ErrorCode.IMAGE_TOO_LARGE,
            f"image {where} is {width}x{height} = {width * height:,} pixels, over media.max_image_pixels "
            f"({max_pixels:,}). Downscale it, or raise media.max_image_pixels if it is trusted.",
        )
    per_pixel = image_bytes_per_pixel(img)
    if max_bytes is not None and width * height * per_pixel > max_bytes:
        raise RowError(
            ErrorCode.IMAGE_TOO_LARGE,
            f"image {where} decodes to {width}x{height} pixels x {per_pixel} bytes ({img.mode}) = "
            f"{width * height * per_pixel:,} bytes, over media.max_image_bytes ({max_bytes:,}). "
            "Try downscaling it or saving it at 8 bits per sample, or raise media.max_image_bytes if "
            "it is trusted.",
        )


def image_bytes_per_pixel(img) -> int:
    """Bytes one decoded pixel takes, from the header: the mode's bands x the larger of the mode's and the
    file's bytes per sample. Pillow keeps a 16-bit RGBA PNG as 8-bit RGBA, but inflates and unfilters it
    at 16 bits (raw mode ``RGBA;16B``): counting the file's 8 bytes per pixel bounds that work too."""
    from PIL import ImageMode

    try:
        mode = ImageMode.getmode(img.mode)
    except KeyError:  # a mode Pillow cannot describe: count as the widest, 4 samples of 4 bytes
        return 16
    sample = int(mode.typestr[-1])  # numpy typestr: '|u1' -> 1, '<u2' -> 2, '<i4' -> 4
    tile = img.tile[0] if getattr(img, "tile", None) else None
    args = getattr(tile, "args", None)
    raw = args if isinstance(args, str) else next((a for a in args or () if isinstance(a, str)), "")
    if ";16" in raw:
        sample = max(sample, 2)
    elif ";32" in raw:
        sample = max(sample, 4)
    return len(mode.bands) * sample


def check_rate(rate: int, where: str) -> None:
    if rate < PHI4MM.min_audio_sample_rate:
        raise RowError(
            ErrorCode.AUDIO_SAMPLE_RATE_UNSUPPORTED,
            f"audio {where} is sampled at {rate} Hz; Phi-4-multimodal needs at least "
            f"{PHI4MM.min_audio_sample_rate} Hz. Re-record or re-export it at 16 kHz.",
        )


def check_duration(seconds: float, where: str, max_seconds: float) -> None:
    if seconds > max_seconds:
        raise RowError(
            ErrorCode.AUDIO_TOO_LONG,
            f"audio {where} lasts {seconds:.1f} s, over media.max_audio_seconds ({max_seconds:g} s). "
            "Split it, try media.long_audio: chunk, or raise media.max_audio_seconds.",
        )


def check_samples(frames: int, channels: int, rate: int, where: str, max_samples: int | None) -> None:
    if max_samples is not None and frames * channels > max_samples:
        raise RowError(
            ErrorCode.AUDIO_TOO_LARGE,
            f"audio {where} decodes to {frames:,} frames x {channels} channels at {rate} Hz = "
            f"{frames * channels:,} samples, over media.max_audio_samples ({max_samples:,}). Try a mono "
            "16 kHz export, or raise media.max_audio_samples if it is trusted.",
        )
