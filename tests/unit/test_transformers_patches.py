"""The transformers backend's fix of Phi4Multimodal's audio windowing (actors/engines/transformers/patches)."""

import pytest

torch = pytest.importorskip("torch")
modeling = pytest.importorskip("transformers.models.phi4_multimodal.modeling_phi4_multimodal")

from actors.engines.transformers import patches  # noqa: E402

WINDOW = 500  # the audio encoder's window (modeling_phi4_multimodal: max_seq_len)


def test_a_batch_of_long_clips_is_cut_clip_by_clip_as_one_clip_alone_would_be():
    clips = torch.randn(3, 2 * WINDOW + 100, 8)  # 3 clips of 2 whole windows each, the rest dropped
    alone = [patches.unfold_tensor(clips[i : i + 1], WINDOW) for i in range(3)]
    batched = patches.unfold_tensor(clips, WINDOW)
    assert batched.shape == (6, WINDOW, 8)
    assert torch.equal(batched, torch.cat(alone))
    assert torch.equal(alone[1][1], clips[1, WINDOW : 2 * WINDOW])  # window 2 of clip 2: its frames in order


def test_apply_replaces_the_function_the_audio_encoder_calls():
    original = modeling.unfold_tensor
    try:
        patches.apply()
        assert modeling.unfold_tensor is patches.unfold_tensor
    finally:
        modeling.unfold_tensor = original
