"""Media decoding over the committed sample files and deliberately broken inputs."""

import io

import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from actors.media.decode import MediaSource, as_items, decode_audio, decode_image, load_bytes
from schemas.rows import ErrorCode, RowError
from tests.helpers import MEDIA


def _png(img: Image.Image, fmt="PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _code(fn, *args) -> ErrorCode:
    with pytest.raises(RowError) as e:
        fn(*args)
    return e.value.code


@pytest.mark.parametrize(
    "cell",
    [
        lambda p: {"bytes": p.read_bytes(), "path": p.name},
        lambda p: {"bytes": None, "path": str(p)},
        lambda p: {"bytes": None, "path": p.name},  # relative to media_root
        lambda p: p.read_bytes(),
        lambda p: str(p),
        lambda p: f"file://{p}",
    ],
)
def test_every_cell_form_loads_the_same_bytes(cell):
    path = MEDIA / "cat.jpg"
    data, _ = load_bytes(cell(path), MediaSource(media_root=str(MEDIA)), "image")
    assert data == path.read_bytes()


def test_as_items():
    assert as_items(None) == []
    assert as_items({"bytes": None, "path": None}) == []
    assert as_items([b"a", None, b"b"]) == [b"a", b"b"]
    assert as_items("x.jpg") == ["x.jpg"]


def test_missing_file_is_media_not_found_and_http_is_refused(tmp_path):
    src = MediaSource(media_root=str(tmp_path))
    assert _code(load_bytes, "nope.jpg", src, "image") == ErrorCode.MEDIA_NOT_FOUND
    assert _code(load_bytes, "https://example.com/a.jpg", src, "image") == ErrorCode.MEDIA_PATH_REFUSED
    assert _code(load_bytes, 42, src, "image") == ErrorCode.INVALID_INPUT


def test_decode_sample_images():
    cat = decode_image((MEDIA / "cat.jpg").read_bytes(), "cat", 10**8)
    assert (cat.width, cat.height) == (320, 213)
    assert cat.image.mode == "RGB" and np.asarray(cat.image).shape == (213, 320, 3)
    logo = decode_image((MEDIA / "logo.png").read_bytes(), "logo", 10**8)  # RGBA -> RGB on white
    arr = np.asarray(logo.image)
    assert arr.shape == (logo.height, logo.width, 3)
    assert arr[0, 0].tolist() == [255, 255, 255]


def test_exif_orientation_is_applied():
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    decoded = decode_image(_png(img, "JPEG", exif=exif), "rotated", 10**8)
    assert (decoded.width, decoded.height) == (20, 40)


def test_sixteen_bit_and_palette_images_become_rgb():
    grey16 = Image.fromarray((np.arange(64 * 64).reshape(64, 64) * 16).astype(np.uint16))
    d = decode_image(_png(grey16), "g16", 10**8)
    arr = np.asarray(d.image)
    assert d.image.mode == "RGB"
    assert arr.max() == 255 and arr.min() == 0  # scaled, not clipped to a white image
    pal = Image.new("P", (8, 8))
    assert decode_image(_png(pal), "pal", 10**8).width == 8


def test_broken_images():
    good = (MEDIA / "cat.jpg").read_bytes()
    assert _code(decode_image, b"", "e", 10**8) == ErrorCode.IMAGE_DECODE_ERROR
    assert _code(decode_image, good[:300], "t", 10**8) == ErrorCode.IMAGE_DECODE_ERROR
    assert _code(decode_image, b"\x00" * 1000, "z", 10**8) == ErrorCode.IMAGE_DECODE_ERROR
    assert _code(decode_image, good, "big", 1000) == ErrorCode.IMAGE_TOO_LARGE


@pytest.mark.parametrize("name,rate", [("fox.wav", 16000), ("question.flac", 22050),
                                       ("translate_8k.ogg", 8000), ("morning.mp3", 16000)])  # fmt: skip
def test_decode_sample_audio_to_16k_mono(name, rate):
    data = (MEDIA / name).read_bytes()
    info = sf.info(io.BytesIO(data))
    audio = decode_audio(data, name, 0.025, 600)
    assert audio.source_rate == rate
    assert audio.samples.dtype == np.float32 and audio.samples.ndim == 1
    assert audio.seconds == pytest.approx(info.duration, abs=0.01)


def _wav(samples: np.ndarray, rate: int) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, samples, rate, format="WAV")
    return buf.getvalue()


def test_stereo_is_mixed_to_mono():
    t = np.arange(16000) / 16000
    stereo = np.stack([np.sin(2 * np.pi * 440 * t), -np.sin(2 * np.pi * 440 * t)], axis=1) * 0.5
    audio = decode_audio(_wav(stereo, 16000), "st", 0.025, 600)
    assert np.abs(audio.samples).max() < 1e-3  # the channels cancel


def test_audio_error_codes():
    tone = np.zeros(16000, np.float32)
    assert (
        _code(decode_audio, _wav(tone[:4000], 4000), "low", 0.025, 600)
        == ErrorCode.AUDIO_SAMPLE_RATE_UNSUPPORTED
    )
    assert _code(decode_audio, _wav(tone[:100], 16000), "short", 0.025, 600) == ErrorCode.AUDIO_TOO_SHORT
    assert _code(decode_audio, _wav(tone, 16000), "long", 0.025, 0.5) == ErrorCode.AUDIO_TOO_LONG
    assert _code(decode_audio, b"RIFF" + b"\x00" * 40, "junk", 0.025, 600) == ErrorCode.AUDIO_DECODE_ERROR
    assert _code(decode_audio, b"", "empty", 0.025, 600) == ErrorCode.AUDIO_DECODE_ERROR


def test_audio_arrays_with_bad_rates_or_lengths():
    from actors.media.decode import load_audio

    src, wave = MediaSource(), [0.1] * 16000
    for rate in (0, -5, 4000):
        assert _code(load_audio, wave, src, rate, 0.025, 600) == ErrorCode.AUDIO_SAMPLE_RATE_UNSUPPORTED
    assert _code(load_audio, wave, src, 16000, 0.025, 0.5) == ErrorCode.AUDIO_TOO_LONG
    assert (
        _code(load_audio, {"array": wave, "sampling_rate": None}, src, None, 0.025, 600)
        == ErrorCode.INVALID_INPUT
    )


def test_relative_paths_start_at_the_input_directory_or_a_url_root(tmp_path):
    from actors.media.decode import default_media_root

    assert default_media_root(str(MEDIA / "data.parquet")) == str(MEDIA)
    assert default_media_root(str(MEDIA)) == str(MEDIA)
    assert default_media_root("s3://bucket/data/part-0.parquet") == "s3://bucket/data"
    assert default_media_root("s3://bucket/data/") == "s3://bucket/data/"
    url_root = MediaSource(media_root=f"file://{MEDIA}/")
    assert load_bytes("cat.jpg", url_root, "image")[0] == (MEDIA / "cat.jpg").read_bytes()
    http_root = MediaSource(media_root="https://example.com/media")
    assert _code(load_bytes, "cat.jpg", http_root, "image") == ErrorCode.MEDIA_PATH_REFUSED  # http stays off
