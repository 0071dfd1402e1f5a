"""Phi-4-multimodal-instruct facts: the one typed place the rest of the project reads them from.

Every number here is either what Microsoft's checkpoint ships or what vLLM's Phi4MM implementation
(vllm/model_executor/models/phi4mm.py) hard-codes. Nothing here imports torch, vllm or ray.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

Modality = Literal["text", "image", "audio", "image_audio"]
Adapter = Literal["vision", "speech"]


class Phi4MMFacts(BaseModel):
    """Constants of the Phi-4-multimodal prompt format, its encoders and its LoRA adapters."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    user_tag: str = Field("<|user|>", description="Opens a user turn.")
    assistant_tag: str = Field("<|assistant|>", description="Opens the assistant turn the model completes.")
    end_tag: str = Field("<|end|>", description="Closes a turn.")
    system_tag: str = Field("<|system|>", description="Opens an optional system turn.")
    image_tag_format: str = Field("<|image_{}|>", description="Placeholder for the n-th image (1-based).")
    audio_tag_format: str = Field(
        "<|audio_{}|>", description="Placeholder for the n-th audio clip (1-based)."
    )
    image_token_id: int = Field(200010, description="Token id vLLM expands each image placeholder into.")
    audio_token_id: int = Field(200011, description="Token id vLLM expands each audio placeholder into.")
    max_placeholders: int = Field(
        10, description="How many <|image_n|> / <|audio_n|> tags the tokenizer knows (n = 1..10)."
    )

    vision_lora_dir: str = Field("vision-lora", description="Adapter folder used for rows with images.")
    speech_lora_dir: str = Field("speech-lora", description="Adapter folder used for audio-only rows.")
    max_lora_rank: int = Field(320, description="Largest adapter rank the checkpoint ships (speech-lora).")
    lora_layer_modules: tuple[str, ...] = Field(
        ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj"),
        description=(
            "Projections of each language-model layer (layers.N.<name>) an adapter may target: the ones the "
            "checkpoint's adapters target and vLLM's Phi4MM applies LoRA to."
        ),
    )
    supported_lora_ranks: tuple[int, ...] = Field(
        (1, 8, 16, 32, 64, 128, 256, 320, 512), description="max_lora_rank values vLLM accepts."
    )
    architecture: str = Field("Phi4MMForCausalLM", description="vLLM architecture name of the checkpoint.")
    trust_remote_code: bool = Field(
        True, description="The original checkpoint ships its config/processor as remote code."
    )

    # Vision: SigLIP-so400m at 448 px, 14 px patches, HD crops of 448x448 plus one global view.
    crop_size: int = Field(448, description="Side of one HD crop and of the global view, in pixels.")
    patch_size: int = Field(14, description="ViT patch side in pixels.")
    token_compression: int = Field(2, description="2x2 average pooling of the patch grid before projection.")
    default_dynamic_hd: int = Field(
        36, description="Max HD crops per image in the original processor config."
    )
    min_resized_side: int = Field(
        10,
        description="The original processor refuses an image whose side, fitted to its crop grid, is shorter.",
    )
    pixel_mean: float = Field(0.5, description="Per-channel mean the [0, 1] pixels are normalized with.")
    pixel_std: float = Field(0.5, description="Per-channel std the [0, 1] pixels are normalized with.")

    # Audio: 16 kHz log-mel, 10 ms hop, 25 ms window, encoder compresses 8x.
    audio_sample_rate: int = Field(
        16000, description="Rate the audio encoder expects; other rates are resampled."
    )
    min_audio_sample_rate: int = Field(8000, description="Lowest source rate accepted (8 kHz is upsampled).")
    audio_window: int = Field(400, description="STFT window in samples at 16 kHz (25 ms).")
    audio_hop: int = Field(160, description="STFT hop in samples at 16 kHz (10 ms).")
    audio_n_fft: int = Field(512, description="FFT size of the log-mel features (the window is zero-padded).")
    audio_mel_bins: int = Field(80, description="Log-mel channels per frame.")
    audio_mel_max_hz: float = Field(7690.0, description="Upper edge of the mel filterbank (Kaldi mel scale).")
    audio_preemphasis: float = Field(0.97, description="Pre-emphasis coefficient, applied within each frame.")
    audio_pcm_scale: float = Field(32768.0, description="Float samples are scaled to 16-bit PCM range.")
    audio_compression_rate: int = Field(8, description="Encoder frames per audio token.")
    audio_qformer_compression_rate: int = Field(1, description="Further compression after the encoder.")

    def image_tag(self, n: int) -> str:
        return self.image_tag_format.format(n)

    def audio_tag(self, n: int) -> str:
        return self.audio_tag_format.format(n)

    def adapter_for(self, num_images: int, num_audios: int) -> Adapter | None:
        """Image or image+audio rows use the vision adapter, audio-only rows speech, text rows none."""
        if num_images > 0:
            return "vision"
        if num_audios > 0:
            return "speech"
        return None

    def adapter_dir(self, adapter: Adapter) -> str:
        return self.vision_lora_dir if adapter == "vision" else self.speech_lora_dir


PHI4MM = Phi4MMFacts()
