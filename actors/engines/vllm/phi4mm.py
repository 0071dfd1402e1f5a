"""vLLM's Phi4MM, taught to take the CPU stage's prepared media (``actors.media.features``).

vLLM 0.32's Phi4MM accepts raw images and waveforms only, so the checkpoint's processor (resize, pad,
crops, log-mel) would run in the GPU actor's process for every request, taking most of its CPU time. This
subclass adds a second input form per modality, a dict of tensors (vLLM's ``DictEmbeddingItems``):

    image: {"image_canvas": [(H, W, 3) uint8], "image_attention_mask": [(1+crops, 32, 32) uint8],
            "image_sizes": [(2,) int64 = (H, W)], "num_img_tokens": [int]}
    audio: {"input_audio_embeds": [(frames, 80) float32], "audio_with_images": [bool]}

The audio features are already what the model consumes; the flag picks the audio projection. The image
canvas is finished on the model's device by ``crops_from_canvas``: the original processor's
ToTensor/Normalize, 448 px tiling and bicubic global view.
Raw media still work (dummy inputs for profiling use them). Imports vLLM and torch: load it only in the
GPU actor, through ``actors.engines.vllm.plugin.register``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import torch
from vllm.model_executor.models import phi4mm
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.inputs import MultiModalFieldConfig
from vllm.multimodal.parse import DictEmbeddingItems, MultiModalDataParser

from actors.media.features import crops_from_canvas
from schemas.model import PHI4MM


def _image_field_config(data: Mapping[str, object]) -> dict[str, MultiModalFieldConfig]:
    return dict(
        image_canvas=MultiModalFieldConfig.batched("image"),
        image_attention_mask=MultiModalFieldConfig.batched("image"),
        image_sizes=MultiModalFieldConfig.batched("image", keep_on_cpu=True),
        num_img_tokens=MultiModalFieldConfig.batched("image", keep_on_cpu=True),
    )


def _audio_field_config(data: Mapping[str, object]) -> dict[str, MultiModalFieldConfig]:
    return dict(
        input_audio_embeds=MultiModalFieldConfig.batched("audio"),
        audio_with_images=MultiModalFieldConfig.batched("audio", keep_on_cpu=True),
    )


class PreparedDataParser(MultiModalDataParser):
    """Parses a dict of prepared tensors as one modality's items; anything else as vLLM does."""

    def _parse_image_data(self, data):
        if isinstance(data, dict) and "image_canvas" in data:
            return DictEmbeddingItems(data, "image", set(_image_field_config(data)), _image_field_config)
        return super()._parse_image_data(data)

    def _parse_audio_data(self, data):
        if isinstance(data, dict) and "input_audio_embeds" in data:
            return DictEmbeddingItems(data, "audio", set(_audio_field_config(data)), _audio_field_config)
        return super()._parse_audio_data(data)


class PreparedProcessingInfo(phi4mm.Phi4MMProcessingInfo):
    def get_data_parser(self):
        return PreparedDataParser(
            target_sr=self.get_feature_extractor().sampling_rate,
            audio_resample_method="scipy",
            expected_hidden_size=self._get_expected_hidden_size(),
        )


class PreparedMultiModalProcessor(phi4mm.Phi4MMMultiModalProcessor):
    def _get_mm_fields_config(self, hf_inputs, hf_kwargs):
        return {
            **super()._get_mm_fields_config(hf_inputs, hf_kwargs),
            **_image_field_config(hf_inputs),
            **_audio_field_config(hf_inputs),
        }

    def _get_prompt_updates(self, mm_items, hf_processor_mm_kwargs, out_mm_kwargs) -> Sequence:
        updates = list(super()._get_prompt_updates(mm_items, hf_processor_mm_kwargs, out_mm_kwargs))
        images, audios = mm_items.get("image"), mm_items.get("audio")

        def image_replacement(i: int) -> list[int]:
            return [PHI4MM.image_token_id] * int(images.get(i)["num_img_tokens"])

        def audio_replacement(i: int) -> list[int]:
            frames = int(audios.get(i)["input_audio_embeds"].shape[0])
            return [PHI4MM.audio_token_id] * self.info._compute_audio_embed_size(frames)

        for n, update in enumerate(updates):
            if update.modality == "image" and isinstance(images, DictEmbeddingItems):
                updates[n] = dataclasses.replace(update, replacement=image_replacement)
            elif update.modality == "audio" and isinstance(audios, DictEmbeddingItems):
                updates[n] = dataclasses.replace(update, replacement=audio_replacement)
        return updates


def _items(value) -> list[torch.Tensor]:
    """A batched field arrives stacked (equal shapes) or as a list (ragged)."""
    return list(value.unbind(0)) if isinstance(value, torch.Tensor) else list(value)


@MULTIMODAL_REGISTRY.register_processor(
    PreparedMultiModalProcessor, info=PreparedProcessingInfo, dummy_inputs=phi4mm.Phi4MMDummyInputsBuilder
)
class Phi4MMPreparedForCausalLM(phi4mm.Phi4MMForCausalLM):
    """Phi4MMForCausalLM that also takes prepared image canvases and log-mel features.

    It also projects each prepared audio clip the way the original model does: with the vision-speech
    projection when its request has images. vLLM's runner encodes one modality at a time, so vLLM's
    Phi4MM never sees images and audio in one call and always uses the speech projection; the
    ``audio_with_images`` flag the CPU stage sets per clip carries the request's shape across.
    """

    def embed_multimodal(self, **kwargs: object):
        # A profiler scope per modality (bench.engine_work sorts the GPU's time by it); ~1 us when unprofiled.
        modality = "audio" if "audio_with_images" in kwargs or "input_audio_embeds" in kwargs else "image"
        with torch.profiler.record_function(f"phi4mm: {modality} encoder"):
            return self._embed_multimodal(**kwargs)

    def _embed_multimodal(self, **kwargs: object):
        with_images = kwargs.pop("audio_with_images", None)
        if with_images is None:
            return super().embed_multimodal(**kwargs)
        features = kwargs.pop("input_audio_embeds")
        embeddings = tuple(super().embed_multimodal(**kwargs)) if kwargs else ()
        dtype = next(self.embed_tokens_extend.parameters()).dtype
        for clip, vision in zip(_items(features), _items(with_images), strict=True):
            mode = "vision" if bool(vision) else "speech"
            embeddings += (self.embed_tokens_extend(clip.to(dtype), audio_projection_mode=mode),)
        return embeddings

    def _parse_and_validate_multimodal_inputs(self, **kwargs: object):
        if "image_canvas" not in kwargs:
            return super()._parse_and_validate_multimodal_inputs(**kwargs)
        finished: dict[str, object] = {}
        for key, value in kwargs.items():  # keep the key order: it decides images-before-audio
            if key == "image_canvas":
                finished["input_image_embeds"] = [crops_from_canvas(c) for c in _items(value)]
            elif key == "image_attention_mask":
                finished[key] = [m.to(torch.long) for m in _items(value)]
            else:
                finished[key] = value
        return super()._parse_and_validate_multimodal_inputs(**finished)
