"""The CPU stage's model inputs against the checkpoint processor's arithmetic.

References: transformers' Phi4MultimodalFeatureExtractor (the port of Microsoft's feature extractor) for
audio, and the tiny checkpoint's processor (jobs/tiny_model), which is what vLLM runs on raw media and
follows the original's steps, for images. tests/integration/test_engine_contract.py checks the same
through the engine."""

import importlib.util

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from PIL import Image

from actors.media.features import (
    crop_masks,
    crops_from_canvas,
    image_canvas,
    log_mel,
    tokens_from_masks,
)
from actors.tokens import fitted_size, num_audio_frames, num_image_tokens
from schemas.rows import ErrorCode, RowError
from tests.helpers import MEDIA, REPO


@pytest.fixture(scope="module")
def tiny_processing():
    spec = importlib.util.spec_from_file_location(
        "tiny_proc", REPO / "jobs" / "tiny_model" / "processing_phi4mm_tiny.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("samples", [400, 559, 16000, 7 * 16000 + 123])
def test_log_mel_matches_the_transformers_feature_extractor(samples):
    from transformers import Phi4MultimodalFeatureExtractor

    wave = np.random.default_rng(samples).normal(0, 0.1, samples).astype(np.float32)
    ref = Phi4MultimodalFeatureExtractor()(wave, sampling_rate=16000, return_tensors="np")[
        "audio_input_features"
    ][0]
    ours = log_mel(wave)
    assert ours.shape == ref.shape == (num_audio_frames(samples), 80) and ours.dtype == np.float32
    np.testing.assert_allclose(ours, ref, atol=2e-3)  # log domain; float32 FFT against float64


def test_log_mel_of_real_speech_matches_the_engines_processor(tiny_processing):
    import soundfile as sf

    speech, rate = sf.read(MEDIA / "fox.wav", dtype="float32")
    assert rate == 16000
    ref = tiny_processing.Phi4MMTinyAudioProcessor().extract(speech)
    np.testing.assert_allclose(log_mel(speech), ref, atol=2e-3)
    # the features carry the signal: a different clip is far away
    assert np.abs(log_mel(speech[::-1].copy()) - ref).max() > 1.0


def test_short_clip_has_no_frames():
    assert log_mel(np.zeros(399, np.float32)).shape == (0, 80)


@pytest.mark.parametrize("dynamic_hd", [1, 2, 4, 16])
@pytest.mark.parametrize("size", [(1, 1), (320, 213), (37, 900), (1000, 20), (449, 448), (1920, 1080)])
def test_canvas_crops_equal_the_engines_processor_exactly(tiny_processing, size, dynamic_hd):
    photo = Image.open(MEDIA / "coffee.jpg").convert("RGB").resize(size, Image.BICUBIC)
    try:
        ref = tiny_processing.Phi4MMTinyImageProcessor(dynamic_hd=dynamic_hd)([photo])
    except ValueError:  # the original refuses too-extreme aspect ratios; so does the CPU stage
        with pytest.raises(RowError) as refused:
            image_canvas(photo, dynamic_hd)
        assert refused.value.code == ErrorCode.IMAGE_ASPECT_RATIO_UNSUPPORTED
        return
    canvas = image_canvas(photo, dynamic_hd)
    crops = crops_from_canvas(torch.from_numpy(canvas.pixels))
    assert crops.shape == ref["input_image_embeds"][0].shape
    assert torch.equal(crops, ref["input_image_embeds"][0])
    assert torch.equal(torch.from_numpy(canvas.mask).long(), ref["image_attention_mask"][0])
    assert list(canvas.pixels.shape[:2]) == ref["image_sizes"][0].tolist()
    assert canvas.num_tokens == num_image_tokens(*size, dynamic_hd)


@settings(max_examples=300, deadline=None)
@given(
    width=st.integers(1, 9000),
    height=st.integers(1, 9000),
    dynamic_hd=st.sampled_from([1, 2, 4, 9, 16, 36]),
)
def test_tokens_counted_from_the_masks_equal_the_token_arithmetic(width, height, dynamic_hd):
    canvas, resized = fitted_size(width, height, dynamic_hd)
    assume(min(resized) >= 10)  # smaller is refused (IMAGE_ASPECT_RATIO_UNSUPPORTED), as the original does
    mask = crop_masks(canvas, resized)
    assert mask.shape[0] == 1 + (canvas[0] // 448) * (canvas[1] // 448)
    assert tokens_from_masks(mask, canvas) == num_image_tokens(width, height, dynamic_hd)


def test_extreme_aspect_ratio_is_an_error_with_advice():
    with pytest.raises(RowError) as e:
        image_canvas(Image.new("RGB", (4000, 3)), 4)
    assert e.value.code == ErrorCode.IMAGE_ASPECT_RATIO_UNSUPPORTED
    assert "less extreme aspect ratio" in e.value.message


def _camera_jpeg(size=(4032, 3024), orientation: int | None = None) -> bytes:
    import io

    photo = Image.open(MEDIA / "coffee.jpg").convert("RGB").resize(size, Image.BICUBIC)
    buf = io.BytesIO()
    if orientation is None:
        photo.save(buf, format="JPEG", quality=92)
    else:
        exif = Image.Exif()
        exif[0x0112] = orientation
        photo.save(buf, format="JPEG", quality=92, exif=exif.tobytes())
    return buf.getvalue()


@pytest.mark.parametrize("orientation", [None, 6])
@pytest.mark.parametrize("dynamic_hd", [4, 16])
def test_fast_jpeg_decode_keeps_crops_and_tokens_and_stays_close(dynamic_hd, orientation):
    from actors.media.decode import decode_image
    from actors.preprocess import prepared_image

    data = _camera_jpeg(orientation=orientation)
    exact = decode_image(data, "photo", 10**9)
    fast = decode_image(data, "photo", 10**9, lambda w, h: fitted_size(w, h, dynamic_hd)[1])
    assert exact.jpeg_scale == 1 and fast.jpeg_scale in (2, 4)
    assert (fast.width, fast.height) == (exact.width, exact.height)  # oriented: portrait when turned
    assert (exact.width < exact.height) == (orientation == 6)
    assert fast.image.width * fast.jpeg_scale <= exact.width + fast.jpeg_scale  # really decoded smaller
    a, b = prepared_image(exact, dynamic_hd), prepared_image(fast, dynamic_hd)
    assert (a["width"], a["height"], a["mask"], a["tokens"]) == (
        b["width"],
        b["height"],
        b["mask"],
        b["tokens"],
    )
    assert a["uuid"] != b["uuid"]  # different pixels must not share the engine's cache entry
    pa_, pb = (np.frombuffer(x["canvas"], np.uint8).astype(np.int16) for x in (a, b))
    assert np.abs(pa_ - pb).mean() < 2.0  # out of 255: a slightly different resampling of the same picture


def test_fast_jpeg_decode_of_a_sliver_is_still_the_aspect_ratio_error():
    from actors.media.decode import decode_image

    sliver = decode_image(
        _camera_jpeg(size=(20000, 2)), "sliver", 10**9, lambda w, h: fitted_size(w, h, 16)[1]
    )
    with pytest.raises(RowError) as e:
        image_canvas(sliver.image, 16, size=(sliver.width, sliver.height))
    assert e.value.code == ErrorCode.IMAGE_ASPECT_RATIO_UNSUPPORTED


def test_fast_jpeg_decode_leaves_small_pictures_and_other_formats_exact():
    import io

    from actors.media.decode import decode_image

    small = _camera_jpeg(size=(900, 600))
    photo = Image.open(MEDIA / "coffee.jpg").convert("RGB").resize((4032, 3024))
    png = io.BytesIO()
    photo.save(png, format="PNG")
    reduce_to = lambda w, h: fitted_size(w, h, 16)[1]  # noqa: E731
    for data in (small, png.getvalue()):
        d = decode_image(data, "x", 10**9, reduce_to)
        assert d.jpeg_scale == 1 and d.image.size == (d.width, d.height)


@settings(max_examples=300, deadline=None)
@given(
    long=st.integers(1, 20000),
    short=st.integers(1, 200),
    wide=st.booleans(),
    dynamic_hd=st.sampled_from([1, 2, 4, 16, 36]),
)
def test_letterbox_size_pads_the_short_side_just_enough(long, short, wide, dynamic_hd):
    from actors.tokens import letterbox_size

    short = min(short, long)
    size = (long, short) if wide else (short, long)
    padded = letterbox_size(*size, dynamic_hd)
    assert min(fitted_size(*padded, dynamic_hd)[1]) >= 10  # what the original processor accepts
    if padded == size:
        return
    pad_axis = 1 if wide else 0
    assert padded[1 - pad_axis] == size[1 - pad_axis] and padded[pad_axis] > size[pad_axis]
    one_less = list(padded)
    one_less[pad_axis] -= 1
    assert min(fitted_size(*one_less, dynamic_hd)[1]) < 10  # no more padding than needed
