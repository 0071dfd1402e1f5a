"""Write a full-size Phi-4-multimodal checkpoint without model weights, for dummy-weight runs on a GPU.

    python -m jobs.make_tiny_model OUT_DIR --full-size [--dynamic-hd N] [--no-lora-weights]

The tiny checkpoint (``jobs/make_tiny_model.py``) exercises the code paths on a CPU; this one describes the
released 5.6B model exactly, so that a ``load_format="dummy"`` engine allocates, schedules and runs at the
real model's size: same KV-cache footprint, same LongRoPE, same LoRA shapes, same image/audio token counts.

What it writes, and where each value comes from. "Released" means microsoft/Phi-4-multimodal-instruct at
revision ``RELEASED_REVISION``; there is no hub access here, so the values were reconstructed from public
copies and checked against the sha256 digests of the released files that third-party projects pin:

- ``config.json``: the released ``config.json`` key for key, in its order (``released_config()``:
  serialised as the release was, it hashes to the released file's ``RELEASED_CONFIG_SHA256``, which
  ``tests/unit/test_full_size_model.py`` pins). Only ``auto_map`` differs: the released one names
  ``modeling_phi4mm.py`` and the hub tokenizer ``Xenova/gpt-4o``, neither of which is here; this one names
  the project's own config/processor code (``jobs/tiny_model/``, copied in, as for the tiny checkpoint).
  It holds the language model (3072 wide, 32 layers, 24 heads, 8 KV heads, vocabulary 200064, LongRoPE
  with its 48 long/short factors over 4096 original positions), the audio encoder (24 conformer blocks,
  1024 wide), the image/audio embedding layers and the ``vision_lora``/``speech_lora`` sections. The vision
  tower is not in it: vLLM hard-codes SigLIP-so400m for Phi4MM, as for the tiny checkpoint.
- ``vision-lora/`` and ``speech-lora/``: ``adapter_config.json`` as released (``LoraSpec.adapter_config``;
  speech-lora's hashes to the released file's ``RELEASED_SPEECH_ADAPTER_CONFIG_SHA256``; vision-lora's
  differs from it only in rank, alpha and dropout, taken from the released ``config.json``, and has the
  released file's size, 464 bytes) and, unless ``lora_weights=False``, an ``adapter_model.safetensors`` of
  random bfloat16 tensors with the released names and shapes (``lora_tensor_shapes``): 0.74 GB for vision
  (r=256) and 0.92 GB for speech (r=320), the latter the released file's size to the byte (922,782,296).
- tokenizer, ``processor_config.json`` and ``generation_config.json``: shared with the tiny checkpoint
  (``write_shared_files``), with ``dynamic_hd`` 36 by default, as in the released
  ``preprocessor_config.json`` (not hash-checked: as Microsoft's sample fine-tuning scripts rewrite it).
  The tokenizer is the project's (the special tokens at their real ids), not the real vocabulary.
"""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from jobs.make_tiny_model import REMOTE_CODE_AUTO_MAP, VOCAB_SIZE, write_shared_files
from schemas.model import PHI4MM, Adapter

RELEASED_REVISION = "93f923e1a7727d1c4f446756212d9d3e8fcc5d81"
RELEASED_CONFIG_SHA256 = "49e1c05f93d43d7f17715b779a2576235b019f587285d7d914e5b05156253f62"
RELEASED_SPEECH_ADAPTER_CONFIG_SHA256 = "ed252a6ae210888ee69f5720bd7e8d8261f0abfda90b18ea6452316c71336df8"

# Random LoRA values are N(0, 1) times this, so that an adapter's update (alpha/r * B @ A, entries about
# 2 * 0.01**2 * sqrt(r) ~ 3e-3) is of the order of vLLM's dummy weights (uniform in +-1e-3): it changes a
# dummy model's outputs without blowing up its activations.
LORA_INIT_SCALE = 0.01

# LongRoPE factors of the released config.json (one per rotary frequency: 128 * 0.75 / 2 = 48).
ROPE_LONG_FACTOR: tuple[float, ...] = (
    1, 1.118320672, 1.250641126, 1.398617824, 1.564103225, 1.74916897, 1.956131817, 2.187582649,
    2.446418898, 2.735880826, 3.059592084, 3.421605075, 3.826451687, 4.279200023, 4.785517845,
    5.351743533, 5.984965424, 6.693110555, 7.485043894, 8.370679318, 9.36110372, 10.4687158,
    11.70738129, 13.09260651, 14.64173252, 16.37415215, 18.31155283, 20.47818807, 22.90118105,
    25.61086418, 28.64115884, 32.03, 32.1, 32.13, 32.23, 32.6, 32.61, 32.64, 32.66, 32.7, 32.71,
    32.93, 32.97, 33.28, 33.49, 33.5, 44.16, 47.77,
)  # fmt: skip
ROPE_SHORT_FACTOR: tuple[float, ...] = (1.0,) * len(ROPE_LONG_FACTOR)


class LanguageModel(BaseModel):
    """The released language model's sizes (Phi-4-mini): what the LoRA adapters' shapes follow from."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    hidden_size: int = 3072
    intermediate_size: int = 8192
    num_hidden_layers: int = 32
    num_attention_heads: int = 24
    num_key_value_heads: int = 8

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def projections(self) -> dict[str, tuple[int, int]]:
        """(fan_in, fan_out) of each projection the adapters wrap, by its name inside a decoder layer."""
        qkv = (self.num_attention_heads + 2 * self.num_key_value_heads) * self.head_dim
        return {
            "self_attn.qkv_proj": (self.hidden_size, qkv),
            "self_attn.o_proj": (self.num_attention_heads * self.head_dim, self.hidden_size),
            "mlp.gate_up_proj": (self.hidden_size, 2 * self.intermediate_size),
            "mlp.down_proj": (self.intermediate_size, self.hidden_size),
        }


class LoraSpec(BaseModel):
    """One released adapter: its section of config.json and its PEFT adapter_config.json."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    adapter: Adapter
    r: int
    lora_alpha: int
    dropout: float = Field(description="config.json's `dp`, the adapter's `lora_dropout`.")
    layer: str = Field(description="config.json's regex for the modules the released modeling code wraps.")

    def config_section(self) -> dict:
        """The ``vision_lora``/``speech_lora`` value of the released config.json."""
        return {"dp": self.dropout, "layer": self.layer, "lora_alpha": self.lora_alpha, "r": self.r}

    def adapter_config(self) -> dict:
        """The released ``<adapter>-lora/adapter_config.json``: PEFT's fields, with module names where
        config.json has a regex."""
        return {
            "auto_mapping": None, "base_model_name_or_path": "TBA", "bias": "none",
            "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True,
            "layers_pattern": None, "layers_to_transform": None, "lora_alpha": self.lora_alpha,
            "lora_dropout": self.dropout, "modules_to_save": [], "peft_type": "LORA", "r": self.r,
            "revision": None, "target_modules": [name.split(".")[1] for name in LM.projections()],
            "task_type": "CAUSAL_LM",
        }  # fmt: skip


LM = LanguageModel()
VISION_LORA = LoraSpec(
    adapter="vision",
    r=256,
    lora_alpha=512,
    dropout=0.0,
    layer=r"layers.*((self_attn\.(qkv_proj|o_proj))|(mlp\.(gate_up|down)_proj))",
)
SPEECH_LORA = LoraSpec(
    adapter="speech",
    r=PHI4MM.max_lora_rank,  # 320, the largest rank the release ships
    lora_alpha=640,
    dropout=0.01,
    layer=r"((layers.*self_attn\.(qkv|o)_proj)|(layers.*mlp\.(gate_up|down)_proj))",
)


def _audio_encoder() -> dict:
    """``audio_processor.config`` of the released config.json: the 24-block Cascades conformer."""
    return {
        "activation": "swish",
        "activation_checkpointing": {"interval": 1, "module": "transformer", "offload": False},
        "attention_dim": 1024, "attention_heads": 16, "batch_norm": False, "bias_in_glu": True,
        "causal": True, "chunk_size": -1, "cnn_layer_norm": True, "conv_activation": "swish",
        "conv_glu_type": "swish", "depthwise_multiplier": 1, "depthwise_seperable_out_channel": 1024,
        "dropout_rate": 0.0, "encoder_embedding_config": {"input_size": PHI4MM.audio_mel_bins},
        "ext_pw_kernel_size": 1, "ext_pw_out_channel": 1024, "input_layer": "nemo_conv",
        "input_size": PHI4MM.audio_mel_bins, "kernel_size": 3, "left_chunk": 18, "linear_units": 1536,
        "nemo_conv_settings": {"conv_channels": 1024}, "num_blocks": 24,
        "relative_attention_bias_args": {"t5_bias_max_distance": 500, "type": "t5"},
        "time_reduction": PHI4MM.audio_compression_rate,
    }  # fmt: skip


def _embedding_layers() -> dict:
    """``embd_layer`` of the released config.json: the image and audio projections into the LM."""
    return {
        "audio_embd_layer": {
            "compression_rate": PHI4MM.audio_compression_rate, "downsample_rate": 1, "embedding_cls": "audio",
            "enable_gradient_checkpointing": True, "projection_cls": "mlp", "use_conv_downsample": False,
            "use_qformer": False,
        },
        "embedding_cls": "image_audio",
        "image_embd_layer": {
            "crop_size": PHI4MM.crop_size, "embedding_cls": "tune_image",
            "enable_gradient_checkpointing": True, "hd_transform_order": "sub_glb",
            "image_token_compression_cls": "avg_pool_2d", "projection_cls": "mlp", "use_hd_transform": True,
            "with_learnable_separator": True,
        },
    }  # fmt: skip


def released_config() -> dict:
    """The released config.json, key for key and in its order: serialised with ``json.dumps(indent=2)`` and a
    final newline, it is byte-identical to the released file (``RELEASED_CONFIG_SHA256``), which is how the
    values were checked and how the test keeps them."""
    return {
        "_name_or_path": "Phi-4-multimodal-instruct",
        "architectures": [PHI4MM.architecture],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "audio_processor": {"config": _audio_encoder(), "name": "cascades"},
        "auto_map": {
            "AutoConfig": "configuration_phi4mm.Phi4MMConfig",
            "AutoModelForCausalLM": "modeling_phi4mm.Phi4MMForCausalLM",
            "AutoTokenizer": "Xenova/gpt-4o",
        },
        "bos_token_id": 199999,
        "embd_layer": _embedding_layers(),
        "embd_pdrop": 0.0,
        "eos_token_id": 199999,
        "full_attn_mod": 1,
        "hidden_act": "silu",
        "hidden_size": LM.hidden_size,
        "initializer_range": 0.02,
        "intermediate_size": LM.intermediate_size,
        "interpolate_factor": 1,
        "lm_head_bias": False,
        "vision_lora": VISION_LORA.config_section(),
        "speech_lora": SPEECH_LORA.config_section(),
        "max_position_embeddings": 131072,
        "mlp_bias": False,
        "model_type": "phi4mm",
        "num_attention_heads": LM.num_attention_heads,
        "num_hidden_layers": LM.num_hidden_layers,
        "num_key_value_heads": LM.num_key_value_heads,
        "original_max_position_embeddings": 4096,
        "pad_token_id": 199999,
        "partial_rotary_factor": 0.75,
        "resid_pdrop": 0.0,
        "rms_norm_eps": 1e-05,
        "rope_scaling": {
            "long_factor": list(ROPE_LONG_FACTOR),
            "short_factor": list(ROPE_SHORT_FACTOR),
            "type": "longrope",
        },
        "rope_theta": 10000.0,
        "sliding_window": 262144,
        "tie_word_embeddings": True,
        "torch_dtype": "bfloat16",
        "transformers_version": "4.46.1",
        "use_cache": True,
        "vocab_size": VOCAB_SIZE,
        "_attn_implementation": "flash_attention_2",
    }


def model_config() -> dict:
    """The config.json written here: the released one, its ``auto_map`` pointing at the project's code.

    The rest is kept as released, also the keys that do not describe the architecture: ``_name_or_path`` is
    replaced by the checkpoint's path on loading, ``_attn_implementation`` is ignored by vLLM."""
    return {**released_config(), "auto_map": REMOTE_CODE_AUTO_MAP}


def lora_tensor_shapes(rank: int, lm: LanguageModel = LM) -> dict[str, tuple[int, ...]]:
    """PEFT tensor name -> shape of an adapter of this rank over every projection of every layer, as in the
    released adapter_model.safetensors: lora_A is (rank, fan_in), lora_B is (fan_out, rank)."""
    shapes: dict[str, tuple[int, ...]] = {}
    for layer in range(lm.num_hidden_layers):
        for module, (fan_in, fan_out) in lm.projections().items():
            prefix = f"base_model.model.model.layers.{layer}.{module}"
            shapes[f"{prefix}.lora_A.weight"] = (rank, fan_in)
            shapes[f"{prefix}.lora_B.weight"] = (fan_out, rank)
    return shapes


def _write_lora_weights(out: Path, spec: LoraSpec, seed: int) -> None:
    """Random bfloat16 adapter weights (generated in bfloat16: about as fast as writing them)."""
    import torch
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(seed)
    tensors = {
        name: torch.randn(shape, dtype=torch.bfloat16, generator=gen).mul_(LORA_INIT_SCALE)
        for name, shape in lora_tensor_shapes(spec.r).items()
    }
    save_file(tensors, str(out / "adapter_model.safetensors"))


def write_adapter(out: Path, spec: LoraSpec, seed: int, weights: bool) -> None:
    out.mkdir(parents=True, exist_ok=True)
    # PEFT's own serialisation (what the release was written with): sorted keys, indent 2, no final newline.
    (out / "adapter_config.json").write_text(json.dumps(spec.adapter_config(), indent=2, sort_keys=True))
    if weights:
        _write_lora_weights(out, spec, seed)


def write_full_size_checkpoint(
    out_dir: str | Path, dynamic_hd: int = PHI4MM.default_dynamic_hd, lora_weights: bool = True
) -> Path:
    """Write the checkpoint into ``out_dir`` (created if missing) and return its path.

    ``lora_weights=False`` writes each adapter's adapter_config.json only (enough for config checks and
    ``actors.engines.vllm.engine.lora_rank_of``, not for serving with LoRA), sparing the ~1.6 GB of weights."""
    out = Path(out_dir)
    write_shared_files(out, dynamic_hd)
    (out / "config.json").write_text(json.dumps(model_config(), indent=2) + "\n")
    for seed, spec in enumerate((VISION_LORA, SPEECH_LORA), start=1):
        write_adapter(out / PHI4MM.adapter_dir(spec.adapter), spec, seed, lora_weights)
    return out
