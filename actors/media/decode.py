"""Media decoding: whatever a Parquet cell holds -> RGB pixels or 16 kHz mono float32 audio.

Pure functions, no Ray, no engine. Failures raise ``RowError`` with a stable code; the CPU stage turns
them into error rows.

Accepted cell forms for an image or audio column (one item, or a list of items for several per row):
- ``{"bytes": b"...", "path": "x.jpg"}``: Hugging Face datasets' storage type; bytes win over path;
- raw ``bytes``;
- a path string: relative to ``media_root``, absolute, or a URL (``s3://``, ``gs://``, ``file://``;
  ``http(s)://`` only when allowed), within the trust boundary of ``actors.media.policy``.

Work per item is bounded before it is done: encoded bytes by ``max_media_bytes`` (a bounded read), decoded
images by pixels and by pixels x bytes per pixel, decoded audio by frames x channels, all read from the
header before decoding.
"""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np

from actors.media.limits import (
    check_duration,
    check_image_header,
    check_media_size,
    check_rate,
    check_samples,
)
from actors.media.policy import MediaSource, read_media_path, resolve_media_path, scheme_of
from schemas.model import PHI4MM
from schemas.rows import ErrorCode, RowError


@dataclass(frozen=True)
class DecodedImage:
    """A decoded picture and the size the model sees it at: its own (oriented) size, or a smaller one
    after a downscale. ``image`` may hold fewer pixels than that: after a reduced-scale JPEG decode
    (``jpeg_scale`` > 1; still at least what the crop grid needs) or a downscale, whose resampling is
    left to the one resize into the canvas."""

    image: object  # PIL.Image.Image in mode RGB
    digest: str = ""  # blake2b of the encoded bytes it came from: the engine's cache key for this image
    size: tuple[int, int] | None = None  # (width, height) the model sees; None: image.size
    jpeg_scale: int = 1  # 1: full decode; 2, 4, 8: libjpeg decoded it at 1/jpeg_scale

    @property
    def width(self) -> int:
        return (self.size or self.image.size)[0]

    @property
    def height(self) -> int:
        return (self.size or self.image.size)[1]


@dataclass(frozen=True)
class DecodedAudio:
    samples: np.ndarray  # float32 mono at PHI4MM.audio_sample_rate
    source_rate: int

    @property
    def seconds(self) -> float:
        return len(self.samples) / PHI4MM.audio_sample_rate


def as_items(cell) -> list:
    """A cell as a list of media items: null -> [], a list -> its non-null items, anything else -> [cell].

    A list of numbers is one item (an audio waveform), not a list of items."""
    if cell is None:
        return []
    if isinstance(cell, (list, tuple)):
        if is_waveform(cell):
            return [cell]
        return [item for item in cell if not _is_empty(item)]
    return [] if _is_empty(cell) else [cell]


def is_waveform(item) -> bool:
    if isinstance(item, np.ndarray):
        return item.dtype.kind == "f" and item.ndim == 1
    if isinstance(item, (list, tuple)) and item:
        first = next((v for v in item if v is not None), None)
        return isinstance(first, (float, int)) and not isinstance(first, bool)
    return False


def _is_empty(item) -> bool:
    if item is None:
        return True
    if isinstance(item, dict):
        return item.get("bytes") is None and not item.get("path") and item.get("array") is None
    return isinstance(item, (str, bytes)) and len(item) == 0


def load_bytes(item, source: MediaSource, kind: str) -> tuple[bytes, str]:
    """Return (bytes, a short description of where they came from) for one media item, at most
    ``source.max_bytes`` of them; a path is read only within the trust boundary (``actors.media.policy``)."""
    if isinstance(item, dict):
        if item.get("bytes") is not None:
            data, where = bytes(item["bytes"]), item.get("path") or "<bytes>"
            check_media_size(len(data), source.max_bytes, kind, where)  # the path is a label, never read
            return data, where
        item = item.get("path")
    if isinstance(item, (bytes, bytearray, memoryview)):
        check_media_size(len(item), source.max_bytes, kind, "<bytes>")
        return bytes(item), "<bytes>"
    if isinstance(item, str):
        return read_media_path(item, source, kind), item
    raise RowError(
        ErrorCode.INVALID_INPUT,
        f"{kind} cell of type {type(item).__name__} is not media: expected struct<bytes, path>, binary or a path string.",
    )


def remote_media(rows: list[dict], columns, source: MediaSource) -> list[tuple[str, str, str]]:
    """``(url, path, kind)`` of every remote media path the rows' image and audio cells hold that the
    trust boundary allows (refused ones are left to their rows' error), for ``RemoteFetcher.prefetch``."""
    found = []
    for kind, column in (("image", columns.image), ("audio", columns.audio)):
        if not column:
            continue
        for row in rows:
            for item in as_items(row.get(column)):
                path = item.get("path") if isinstance(item, dict) and item.get("bytes") is None else item
                if not isinstance(path, str) or is_waveform(item):
                    continue
                try:
                    target = resolve_media_path(path, source, kind)
                except RowError:
                    continue
                if not target.is_local:
                    found.append((target.location, path, kind))
    return found


def default_media_root(input_path: str) -> str:
    """Where relative media paths start when input.media_root is unset: the input's directory, as
    Hugging Face datasets resolves them."""
    if scheme_of(input_path):
        return (
            input_path
            if input_path.endswith("/") or not input_path.endswith(".parquet")
            else input_path.rsplit("/", 1)[0]
        )
    return input_path if os.path.isdir(input_path) else os.path.dirname(os.path.abspath(input_path))


def decode_image(
    data: bytes,
    where: str,
    max_pixels: int,
    reduce_to: Callable[[int, int], tuple[int, int]] | None = None,
    max_bytes: int | None = None,
) -> DecodedImage:
    """Decode to RGB: first frame of animations, EXIF orientation applied, alpha composited on white.

    ``reduce_to(width, height)``, given the picture's oriented size, names the smallest size it will be
    used at; a JPEG is then decoded at the largest 1/2, 1/4 or 1/8 scale that still covers it.
    ``max_bytes`` caps the decoded size, pixels x bytes per pixel (``actors.media.limits``)."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    if not data:
        raise RowError(ErrorCode.IMAGE_DECODE_ERROR, f"image {where} is empty (0 bytes).")
    try:
        # Header only: the pixel count and sample size are known before any pixel is decoded.
        img = Image.open(io.BytesIO(data))
        width, height = img.size
        check_image_header(img, where, max_pixels, max_bytes)
        full, scale = None, 1
        if reduce_to is not None and img.format == "JPEG" and width >= 2 and height >= 2:
            turned = img.getexif().get(0x0112, 1) in (5, 6, 7, 8)  # EXIF orientation with a 90 degree turn
            full = (height, width) if turned else (width, height)
            need_w, need_h = reduce_to(*full)
            need_w, need_h = max(1, need_w), max(1, need_h)  # an extreme aspect ratio fits to 0 px
            need = (need_h, need_w) if turned else (need_w, need_h)
            img.draft(img.mode, need)  # a no-op unless a smaller DCT scale still covers `need`
            scale = width // img.size[0]
        img.load()
        img = ImageOps.exif_transpose(img)
        img = _to_rgb(img)
    except RowError:
        raise
    except Image.DecompressionBombError as e:  # Pillow's own guard, beyond 2x its MAX_IMAGE_PIXELS
        raise RowError(
            ErrorCode.IMAGE_TOO_LARGE, f"image {where} refused as a decompression bomb: {e}"
        ) from e
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise RowError(
            ErrorCode.IMAGE_DECODE_ERROR, f"image {where} could not be decoded: {type(e).__name__}: {e}"
        ) from e
    if img.width < 1 or img.height < 1:
        raise RowError(
            ErrorCode.IMAGE_DECODE_ERROR, f"image {where} has no pixels ({img.width}x{img.height})."
        )
    digest = hashlib.blake2b(data, digest_size=16).hexdigest()
    if scale > 1:
        return DecodedImage(image=img, digest=digest, size=full, jpeg_scale=scale)
    return DecodedImage(image=img, digest=digest)


def _to_rgb(img):
    from PIL import Image

    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16/32-bit greyscale: scale to 8 bits instead of letting convert() clip at 255
        arr = np.asarray(img, dtype=np.float64)
        peak = arr.max() or 1.0
        img = Image.fromarray((arr * (255.0 / peak)).astype(np.uint8), "L")
    if img.mode == "P":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "RGBa"):
        rgba = img.convert("RGBA")
        canvas = Image.new("RGB", rgba.size, (255, 255, 255))
        canvas.paste(rgba, mask=rgba.getchannel("A"))
        return canvas
    return img.convert("RGB")


def decode_audio(
    data: bytes, where: str, min_seconds: float, max_seconds: float, max_samples: int | None = None
) -> DecodedAudio:
    """Decode WAV/FLAC/OGG/MP3 with libsndfile, mix to mono and resample to 16 kHz with soxr.

    Duration and ``max_samples`` (frames x channels of the decoded clip) are checked from the header
    before decoding: a small FLAC of silence at 192 kHz x 8 channels would otherwise decode to GiBs."""
    import soundfile as sf

    if not data:
        raise RowError(ErrorCode.AUDIO_DECODE_ERROR, f"audio {where} is empty (0 bytes).")
    try:
        with sf.SoundFile(io.BytesIO(data)) as f:
            rate = f.samplerate
            check_duration(f.frames / rate if rate else 0.0, where, max_seconds)
            check_samples(f.frames, f.channels, rate, where, max_samples)
            samples = f.read(dtype="float32", always_2d=True)
    except RowError:
        raise
    except (sf.LibsndfileError, RuntimeError, TypeError, ValueError, OSError) as e:
        raise RowError(
            ErrorCode.AUDIO_DECODE_ERROR, f"audio {where} could not be decoded: {type(e).__name__}: {e}"
        ) from e
    mono = samples[:, 0] if samples.shape[1] == 1 else samples.mean(axis=1)  # no copy for mono files
    return prepare_waveform(mono, rate, where, min_seconds)


def load_audio(
    item,
    source: MediaSource,
    sampling_rate,
    min_seconds: float,
    max_seconds: float,
    max_samples: int | None = None,
) -> DecodedAudio:
    """One audio item in any accepted form: encoded bytes/path, a decoded HF datasets cell
    (``{"array": [...], "sampling_rate": 16000}``), or a float array with the row's sampling-rate column."""
    if isinstance(item, dict) and item.get("array") is not None:
        sampling_rate, item = item.get("sampling_rate") or sampling_rate, item["array"]
    if is_waveform(item):
        if sampling_rate is None:
            raise RowError(
                ErrorCode.INVALID_INPUT,
                "audio is a float array but the row has no sampling rate. Add a sampling-rate column "
                "(input.columns.sampling_rate) or store the audio as encoded bytes.",
            )
        try:
            samples = np.asarray(item, dtype=np.float32)
        except (TypeError, ValueError) as e:
            raise RowError(ErrorCode.AUDIO_DECODE_ERROR, f"audio array is not numeric: {e}") from e
        rate = int(sampling_rate)
        check_rate(rate, "array")  # before any division by it
        check_duration(len(samples) / rate, "array", max_seconds)
        check_samples(len(samples), 1, rate, "array", max_samples)
        return prepare_waveform(samples, rate, "array", min_seconds)
    return decode_audio(*load_bytes(item, source, "audio"), min_seconds, max_seconds, max_samples)


def letterbox(image: DecodedImage, size: tuple[int, int]) -> DecodedImage:
    """The picture centred on a white ``size`` canvas (its own size or larger, in the size the model
    sees it at); a reduced-scale decode is padded at its own scale."""
    from PIL import Image

    if size == (image.width, image.height):
        return image
    sx, sy = image.image.size[0] / image.width, image.image.size[1] / image.height
    canvas = Image.new("RGB", (max(1, round(size[0] * sx)), max(1, round(size[1] * sy))), (255, 255, 255))
    canvas.paste(
        image.image,
        ((canvas.size[0] - image.image.size[0]) // 2, (canvas.size[1] - image.image.size[1]) // 2),
    )
    return replace(image, image=canvas, size=size)


def downscale_size(image: DecodedImage, scale: float) -> tuple[int, int]:
    return max(1, int(image.width * scale)), max(1, int(image.height * scale))


def downscale(image: DecodedImage, scale: float) -> DecodedImage:
    """The same pixels seen at a smaller size: the resize into the canvas resamples them, once."""
    return replace(image, size=downscale_size(image, scale))


def prepare_waveform(samples: np.ndarray, rate: int, where: str, min_seconds: float) -> DecodedAudio:
    """Check the rate and length of a mono waveform and resample it to 16 kHz."""
    target = PHI4MM.audio_sample_rate
    check_rate(rate, where)
    if len(samples) / rate < min_seconds:
        raise RowError(
            ErrorCode.AUDIO_TOO_SHORT,
            f"audio {where} lasts {len(samples) / rate * 1000:.1f} ms, shorter than media.min_audio_seconds "
            f"({min_seconds * 1000:g} ms): there is nothing to transcribe.",
        )
    samples = np.asarray(samples, dtype=np.float32)
    if not np.isfinite(samples).all():
        raise RowError(ErrorCode.AUDIO_DECODE_ERROR, f"audio {where} contains NaN or infinite samples.")
    if rate != target:
        import soxr  # libsoxr's HQ resampler: about 3x faster than scipy's polyphase filter, same length

        samples = soxr.resample(samples, rate, target, quality="HQ").astype(np.float32, copy=False)
    # Resampling can leave a clip a few samples under one analysis window: the encoder needs a full one.
    if len(samples) < PHI4MM.audio_window:
        samples = np.pad(samples, (0, PHI4MM.audio_window - len(samples)))
    return DecodedAudio(samples=np.ascontiguousarray(samples), source_rate=rate)
