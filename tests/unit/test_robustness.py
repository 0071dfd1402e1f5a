"""A corpus of real and broken media through the CPU stage, and a property-based fuzz test: the stage
never raises, and returns exactly one row per input row with a known status and code."""

import io
import struct
import zlib

import numpy as np
import pyarrow as pa
import pytest
import soundfile as sf
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from actors.preprocess import PreprocessRows
from actors.tokens import num_audio_frames
from schemas.rows import MEDIA_STRUCT, ErrorCode
from tests.helpers import MEDIA, make_config

SCHEMA = pa.schema(
    [("id", pa.string()), ("image", MEDIA_STRUCT), ("audio", MEDIA_STRUCT), ("prompt", pa.string())]
)


def _img(mode="RGB", size=(64, 48), fmt="PNG", **kw) -> bytes:
    rng = np.random.default_rng(0)
    if mode == "I;16":
        im = Image.fromarray((rng.random(size[::-1]) * 65535).astype(np.uint16))
    else:
        im = Image.fromarray((rng.random((*size[::-1], 3)) * 255).astype(np.uint8)).convert(mode)
    buf = io.BytesIO()
    if fmt == "GIF":
        frames = [im, Image.new("P", size)]
        im.save(buf, format="GIF", save_all=True, append_images=frames[1:])
    else:
        im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _bomb_png(width=100_000, height=100_000) -> bytes:
    """A valid 1x1 PNG whose header claims a huge canvas: caught before any pixel is decoded."""
    png = _img(size=(1, 1))
    ihdr = struct.pack(">II", width, height) + png[24:29]
    chunk = b"IHDR" + ihdr
    return png[:8] + struct.pack(">I", 13) + chunk + struct.pack(">I", zlib.crc32(chunk)) + png[33:]


def _wav(subtype="PCM_16", rate=16000, channels=1, seconds=0.5, fmt="WAV") -> bytes:
    t = np.arange(int(rate * seconds)) / rate
    x = 0.3 * np.sin(2 * np.pi * 440 * t)
    data = np.stack([x] * channels, axis=1) if channels > 1 else x
    buf = io.BytesIO()
    sf.write(buf, data, rate, subtype=subtype, format=fmt)
    return buf.getvalue()


GOOD_IMAGES = {
    "jpeg": _img(fmt="JPEG"), "png": _img(), "gif-animated": _img("P", fmt="GIF"), "webp": _img(fmt="WEBP"),
    "tiff": _img(fmt="TIFF"), "bmp": _img(fmt="BMP"), "cmyk-jpeg": _img("CMYK", fmt="JPEG"),
    "png-16bit": _img("I;16"), "png-palette": _img("P"), "png-alpha": _img("RGBA"), "png-grey-alpha": _img("LA"),
    "sample-photo": (MEDIA / "coffee.jpg").read_bytes(),
}  # fmt: skip
GOOD_AUDIO = {
    "wav-16": _wav("PCM_16"), "wav-24": _wav("PCM_24"), "wav-32": _wav("PCM_32"), "wav-float": _wav("FLOAT"),
    "wav-stereo-48k": _wav(rate=48000, channels=2), "flac": _wav("PCM_16", fmt="FLAC"),
    "ogg": _wav("VORBIS", fmt="OGG"), "mp3": (MEDIA / "morning.mp3").read_bytes(), "wav-8k": _wav(rate=8000),
}  # fmt: skip
BROKEN = [  # (column, bytes, expected code)
    ("image", b"", "IMAGE_DECODE_ERROR"),
    ("image", GOOD_IMAGES["jpeg"][:200], "IMAGE_DECODE_ERROR"),
    ("image", GOOD_IMAGES["png"][: len(GOOD_IMAGES["png"]) // 2], "IMAGE_DECODE_ERROR"),
    ("image", np.random.default_rng(1).bytes(5000), "IMAGE_DECODE_ERROR"),
    ("image", GOOD_AUDIO["wav-16"], "IMAGE_DECODE_ERROR"),  # audio bytes in the image column
    ("image", _bomb_png(), "IMAGE_TOO_LARGE"),
    ("audio", b"", "AUDIO_DECODE_ERROR"),
    ("audio", GOOD_AUDIO["flac"][:100], "AUDIO_DECODE_ERROR"),
    ("audio", np.random.default_rng(2).bytes(5000), "AUDIO_DECODE_ERROR"),
    ("audio", GOOD_IMAGES["png"], "AUDIO_DECODE_ERROR"),  # an image in the audio column
    ("audio", _wav(rate=4000), "AUDIO_SAMPLE_RATE_UNSUPPORTED"),
    ("audio", _wav(seconds=0.01), "AUDIO_TOO_SHORT"),
]


@pytest.fixture(scope="module")
def stage(tiny_model, tmp_path_factory):
    return PreprocessRows(
        make_config(tiny_model, tmp_path_factory.mktemp("robust"), engine={"max_model_len": 8192})
    )


@pytest.fixture(scope="module")
def fast_stage(tiny_model, tmp_path_factory):
    """The same stage with media.fast_jpeg_decode, whose reduced-scale decode must be as robust."""
    return PreprocessRows(
        make_config(tiny_model, tmp_path_factory.mktemp("robust-fast"), engine={"max_model_len": 8192, "dynamic_hd": 2},
                    media={"fast_jpeg_decode": True})
    )  # fmt: skip


def test_real_formats_decode(stage):
    rows = [{"id": f"image-{k}", "image": {"bytes": v, "path": None}} for k, v in GOOD_IMAGES.items()]
    rows += [{"id": f"audio-{k}", "audio": {"bytes": v, "path": None}} for k, v in GOOD_AUDIO.items()]
    out = stage(pa.Table.from_pylist(rows, schema=SCHEMA)).to_pylist()
    assert {r["id"]: r["error_message"] for r in out if r["status"] != "ok"} == {}
    gif = next(r for r in out if r["id"] == "image-gif-animated")
    assert gif["num_images"] == 1
    stereo = next(r for r in out if r["id"] == "audio-wav-stereo-48k")
    assert stereo["audios"][0]["frames"] == num_audio_frames(8000)  # 0.5 s at 16 kHz, one channel


def test_broken_files_become_error_rows_with_stable_codes(stage):
    rows = [{"id": str(i), col: {"bytes": data, "path": f"f{i}"}} for i, (col, data, _) in enumerate(BROKEN)]
    out = stage(pa.Table.from_pylist(rows, schema=SCHEMA)).to_pylist()
    assert [r["error_code"] for r in out] == [code for _, _, code in BROKEN]
    assert all(r["error_message"] and r["images"] is None for r in out)


cell = st.one_of(
    st.none(),
    st.binary(max_size=64),
    st.sampled_from(list(GOOD_IMAGES.values())[:3] + [GOOD_AUDIO["wav-16"], _bomb_png(), GOOD_IMAGES["cmyk-jpeg"],
                     _img(size=(1800, 1400), fmt="JPEG"), _img(size=(4000, 2), fmt="JPEG"),
                     _img(size=(1200, 900), fmt="JPEG", exif=b"Exif\x00\x00garbage")]),
    st.builds(lambda b, p: {"bytes": b, "path": p}, st.one_of(st.none(), st.binary(max_size=32)),
              st.one_of(st.none(), st.text(max_size=12))),
    st.integers(), st.floats(allow_nan=True), st.text(max_size=20),
    st.lists(st.floats(allow_nan=True, allow_infinity=True, width=32), max_size=50),
    st.lists(st.one_of(st.none(), st.binary(max_size=16)), max_size=3),
)  # fmt: skip
prompt = st.one_of(st.none(), st.integers(), st.text(max_size=40), st.just("<|image_1|><|audio_1|><|end|>"))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.fixed_dictionaries({"id": st.one_of(st.none(), st.text(max_size=5), st.integers()),
                                       "image": cell, "audio": cell, "prompt": prompt,
                                       "max_tokens": st.one_of(st.none(), st.integers(), st.text(max_size=3)),
                                       "sampling_rate": st.one_of(st.none(), st.integers(-5, 100_000))}),
                min_size=1, max_size=6))  # fmt: skip
def test_fuzz_never_raises_and_keeps_one_row_per_input(stage, fast_stage, rows):
    # Cells of any Python type, as no Arrow column could hold them: the row-level entry point.
    codes = {c.value for c in ErrorCode}
    for row, result in [(row, s.prepare(row)) for s in (stage, fast_stage) for row in rows]:
        assert result["status"] in ("ok", "error")
        if result["status"] == "error":
            assert result["error_code"] in codes and result["error_code"] != "PREPROCESS_ERROR", result
        assert result["id"] == (None if row["id"] is None else str(row["id"]))
