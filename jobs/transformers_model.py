"""Phi-4-multimodal checkpoints in the transformers layout (``Phi4MultimodalForCausalLM``), for
``engine.backend: transformers``: a tiny one for tests and the demo (``python -m jobs.make_tiny_model OUT
--layout transformers``) and the released architecture without weights for dummy-weight GPU runs
(``--layout transformers --full-size``; ``bench/gpu.py``'s transformers side).

The language model has the tiny original-layout checkpoint's shape (``jobs.make_tiny_model``: 2 layers,
64 wide, the same tokenizer and the same random LoRA adapters), so weights can be shared between the two
layouts. The towers are tiny too: transformers does not hard-code the SigLIP tower as vLLM does, so the
vision encoder keeps the 448 px / 14 px geometry (the CPU stage's crops and masks) at 1 layer x 32 wide,
and the audio encoder is 2 blocks x 64 wide. Weights are random (seeded) and saved: transformers has no
``load_format: dummy``.
"""

from __future__ import annotations

import json
from pathlib import Path

from jobs import make_tiny_model as tiny
from schemas.model import PHI4MM

ARCHITECTURE = "Phi4MultimodalForCausalLM"
# PEFT's target modules as a full-match regex: the language model's projections only (the audio
# encoder has modules named gate_up_proj/down_proj too, which the checkpoint's adapters do not touch).
LORA_TARGETS = r"model\.layers\.\d+\.(self_attn\.(qkv_proj|o_proj)|mlp\.(gate_up_proj|down_proj))"


def model_config() -> dict:
    vision = {
        "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
        "image_size": PHI4MM.crop_size, "patch_size": PHI4MM.patch_size, "crop_size": PHI4MM.crop_size,
        "image_token_id": PHI4MM.image_token_id, "feature_layer": -2,
    }  # fmt: skip
    audio = {
        "hidden_size": tiny.AUDIO_DIM, "intermediate_size": 2 * tiny.AUDIO_DIM, "num_blocks": 2,
        "num_attention_heads": 2, "ext_pw_out_channel": tiny.AUDIO_DIM,
        "depthwise_separable_out_channel": tiny.AUDIO_DIM, "nemo_conv_channels": 32,
        "time_reduction": PHI4MM.audio_compression_rate, "input_size": PHI4MM.audio_mel_bins,
        "audio_token_id": PHI4MM.audio_token_id, "feature_layer": -2,
    }  # fmt: skip
    return {
        "architectures": [ARCHITECTURE],
        "model_type": "phi4_multimodal",
        "vocab_size": tiny.VOCAB_SIZE,
        "hidden_size": tiny.HIDDEN,
        "intermediate_size": tiny.INTERMEDIATE,
        "num_hidden_layers": tiny.LAYERS,
        "num_attention_heads": tiny.HEADS,
        "num_key_value_heads": tiny.KV_HEADS,
        "hidden_act": "silu",
        "max_position_embeddings": 8192,
        "original_max_position_embeddings": 8192,
        "rms_norm_eps": 1e-5,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 1.0},
        "tie_word_embeddings": True,
        "bos_token_id": 199999,
        "eos_token_id": [199999, 200020],
        "pad_token_id": 199999,
        "vision_config": vision,
        "audio_config": audio,
    }


def write_tiny_transformers_checkpoint(out_dir: str | Path, lora_rank: int = 8, seed: int = 0) -> Path:
    """Write config, random weights (seeded), tokenizer and the two adapters into ``out_dir``."""
    import torch
    from transformers import Phi4MultimodalConfig, Phi4MultimodalForCausalLM

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = Phi4MultimodalForCausalLM(Phi4MultimodalConfig(**model_config()))
    model.save_pretrained(out)
    tiny.write_tokenizer(out)
    generation_config = {"bos_token_id": 199999, "eos_token_id": [199999, 200020], "pad_token_id": 199999}
    (out / "generation_config.json").write_text(json.dumps(generation_config, indent=1))
    for adapter, adapter_seed in (("vision", 1), ("speech", 2)):
        folder = out / PHI4MM.adapter_dir(adapter)
        tiny.write_lora(folder, lora_rank, seed=adapter_seed)  # the same weights as the original layout's
        adapter_config = json.loads((folder / "adapter_config.json").read_text())
        adapter_config["target_modules"] = LORA_TARGETS
        (folder / "adapter_config.json").write_text(json.dumps(adapter_config, indent=1))
    return out


def full_size_config() -> dict:
    """The released model (``jobs.full_size_model.released_config``) as transformers' config: its language
    model and LongRoPE; transformers' defaults for the towers are the released ones (SigLIP-so400m at 448
    px, the 24-block 1024-wide conformer)."""
    from jobs.full_size_model import released_config

    released = released_config()
    keys = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "hidden_act", "max_position_embeddings", "original_max_position_embeddings",
            "rms_norm_eps", "tie_word_embeddings", "bos_token_id", "pad_token_id")  # fmt: skip
    rope = released["rope_scaling"]
    return {
        "architectures": [ARCHITECTURE],
        "model_type": "phi4_multimodal",
        **{k: released[k] for k in keys},
        "eos_token_id": [199999, 200020],
        "rope_parameters": {
            "rope_type": rope["type"],
            "long_factor": rope["long_factor"],
            "short_factor": rope["short_factor"],
            "rope_theta": released["rope_theta"],
            "partial_rotary_factor": released["partial_rotary_factor"],
        },
        "vision_config": {"image_token_id": PHI4MM.image_token_id},
        "audio_config": {"audio_token_id": PHI4MM.audio_token_id},
    }


def write_full_size_transformers_checkpoint(out_dir: str | Path, lora_weights: bool = True) -> Path:
    """Config, tokenizer and the released adapters' shapes (random weights unless ``lora_weights=False``),
    no model weights: load it with ``model.load_format: dummy``."""
    from jobs import full_size_model

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(full_size_config(), indent=2))
    tiny.write_tokenizer(out)
    generation_config = {"bos_token_id": 199999, "eos_token_id": [199999, 200020], "pad_token_id": 199999}
    (out / "generation_config.json").write_text(json.dumps(generation_config, indent=1))
    for seed, spec in enumerate((full_size_model.VISION_LORA, full_size_model.SPEECH_LORA), start=1):
        folder = out / PHI4MM.adapter_dir(spec.adapter)
        full_size_model.write_adapter(folder, spec, seed, lora_weights)
        adapter_config = json.loads((folder / "adapter_config.json").read_text())
        adapter_config["target_modules"] = LORA_TARGETS
        (folder / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2))
    return out
