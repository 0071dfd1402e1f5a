"""Write a tiny Phi-4-multimodal checkpoint in the original layout, for tests and the demo.

    python -m jobs.make_tiny_model OUT_DIR [--dynamic-hd N] [--lora-rank R]
    python -m jobs.make_tiny_model OUT_DIR --layout transformers [--lora-rank R]
    python -m jobs.make_tiny_model OUT_DIR --full-size [--dynamic-hd N] [--no-lora-weights]

``--full-size`` writes the released model's architecture instead (``jobs/full_size_model.py``), for
dummy-weight runs on a GPU; the tokenizer, processor config and remote code below are shared with it.
``--layout transformers`` writes the same tiny language model, tokenizer and adapters in the layout of
transformers' ``Phi4MultimodalForCausalLM`` (``jobs/transformers_model.py``, for
``engine.backend: transformers``), with random weights saved.

What it writes (no model weights: load it with vLLM's ``load_format="dummy"``):
- ``config.json`` for vLLM's ``Phi4MMForCausalLM`` with a 2-layer, 64-wide language model and a 2-block
  audio encoder, ``auto_map`` pointing at this project's own configuration/processor code (copied in, so
  ``trust_remote_code=True`` is exercised exactly as with the real checkpoint);
- a tokenizer with the model's special tokens at the real ids (``<|endoftext|>`` 199999,
  ``<|assistant|>`` 200019, ``<|end|>`` 200020, ``<|user|>`` 200021, ``<|image_n|>``, ``<|audio_n|>``) and a
  vocabulary of 200064 so the hard-coded placeholder ids 200010/200011 exist;
- ``vision-lora/`` and ``speech-lora/``: small random PEFT adapters over qkv/o/gate_up/down projections.

The vision tower is not described here: vLLM hard-codes the full SigLIP-so400m tower for Phi4MM.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from schemas.model import PHI4MM

VOCAB_SIZE = 200064
HIDDEN = 64
INTERMEDIATE = 128
LAYERS = 2
HEADS = 2  # head_dim 32: vLLM's CPU attention needs head_dim in {32, 64, 80, ...}
KV_HEADS = 1
HEAD_DIM = HIDDEN // HEADS
AUDIO_DIM = 64

# config.json's auto_map: this project's config/processor code, copied into every checkpoint it writes.
REMOTE_CODE_AUTO_MAP: dict[str, str] = {
    "AutoConfig": "configuration_phi4mm_tiny.Phi4MMTinyConfig",
    "AutoProcessor": "processing_phi4mm_tiny.Phi4MMTinyProcessor",
}

SPECIAL_TOKENS: dict[int, str] = {
    199999: "<|endoftext|>",
    PHI4MM.image_token_id: "<|endoftext10|>",
    PHI4MM.audio_token_id: "<|endoftext11|>",
    200018: "<|endofprompt|>",
    200019: PHI4MM.assistant_tag,
    200020: PHI4MM.end_tag,
    200021: PHI4MM.user_tag,
    200022: PHI4MM.system_tag,
    200023: "<|tool|>",
    **{200030 + i: PHI4MM.image_tag(i + 1) for i in range(PHI4MM.max_placeholders)},
    **{200040 + i: PHI4MM.audio_tag(i + 1) for i in range(PHI4MM.max_placeholders)},
}
# A few real words so that prompts tokenise into more than unknown tokens.
WORDS = (
    "the a an of and to in is it this that what who where how why describe image audio picture photo "
    "transcribe translate speech say tell me about question answer one sentence text clip into helpful "
    "something please you are hello world caption"
).split()


CHAT_TEMPLATE = (
    "{% for m in messages %}{{ '<|' + m['role'] + '|>' + m['content'] + '<|end|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


def write_tokenizer(out: Path) -> None:
    """A word-level tokenizer with the model's special tokens at their real ids (not the real vocabulary)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab: dict[str, int] = {}
    for i in range(VOCAB_SIZE):
        if i in SPECIAL_TOKENS:
            vocab[SPECIAL_TOKENS[i]] = i
        elif i < len(WORDS):
            vocab[WORDS[i]] = i
        else:
            vocab[f"w{i}"] = i
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<|endoftext|>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##")
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS.values()])
    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
    )
    hf_tok.chat_template = CHAT_TEMPLATE
    hf_tok.save_pretrained(out)


def write_byte_tokenizer(out: Path) -> None:
    """A byte-level tokenizer (every byte a token, no merges) with the model's special tokens at their real
    ids, in place of ``write_tokenizer``'s word-level one: it spells any text, so constrained decoding
    (structured outputs: JSON, choices, regexes) has the tokens it needs on the tiny model."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    byte_chars = sorted(alphabet, key=lambda c: (ord(c) > 255, ord(c)))
    vocab = {c: i for i, c in enumerate(byte_chars)}
    for i in range(len(vocab), VOCAB_SIZE):
        vocab[SPECIAL_TOKENS.get(i, f"w{i}")] = i
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS.values()])
    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>", pad_token="<|endoftext|>"
    )
    hf_tok.chat_template = CHAT_TEMPLATE
    hf_tok.save_pretrained(out)


def _model_config() -> dict:
    audio_layer = {
        "compression_rate": PHI4MM.audio_compression_rate,
        "downsample_rate": 1,
        "embedding_cls": "audio",
        "enable_gradient_checkpointing": False,
        "projection_cls": "mlp",  # vLLM's 'linear' path needs linear_downsample_rate, which it never sets
        "use_conv_downsample": False,
        "use_qformer": False,
    }
    conformer = {
        "activation": "swish", "activation_checkpointing": "", "attention_dim": AUDIO_DIM,
        "attention_heads": 2, "batch_norm": False, "bias_in_glu": True, "causal": True,
        "chunk_size": -1, "left_chunk": 18, "cnn_layer_norm": True, "conv_activation": "swish",
        "conv_glu_type": "swish", "depthwise_multiplier": 1, "depthwise_seperable_out_channel": AUDIO_DIM,
        "dropout_rate": 0.0, "encoder_embedding_config": {"input_size": 80}, "ext_pw_kernel_size": 1,
        "ext_pw_out_channel": AUDIO_DIM, "input_layer": "nemo_conv", "input_size": 80, "kernel_size": 3,
        "linear_units": 2 * AUDIO_DIM, "nemo_conv_settings": {"conv_channels": 32}, "num_blocks": 2,
        "relative_attention_bias_args": {"t5_bias_max_distance": 500, "type": "t5"},
        "time_reduction": PHI4MM.audio_compression_rate,  # must equal audio_embd_layer.compression_rate
    }  # fmt: skip
    return {
        "architectures": [PHI4MM.architecture],
        "model_type": "phi4mm",
        "auto_map": REMOTE_CODE_AUTO_MAP,
        "vocab_size": VOCAB_SIZE,
        "hidden_size": HIDDEN,
        "intermediate_size": INTERMEDIATE,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS,
        "hidden_act": "silu",
        "max_position_embeddings": 8192,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
        "partial_rotary_factor": 1.0,
        "tie_word_embeddings": True,
        "bos_token_id": 199999,
        "eos_token_id": 199999,
        "pad_token_id": 199999,
        "torch_dtype": "float32",
        "img_processor": None,  # None => vLLM's SigLIP-so400m-448 geometry (and its hard-coded tower)
        "embd_layer": {
            "embedding_cls": "image",
            "image_embd_layer": {
                "crop_size": PHI4MM.crop_size,
                "embedding_cls": "tune_image",
                "enable_gradient_checkpointing": False,
                "hd_transform_order": "sub_glb",
                "image_token_compression_cls": "avg_pool_2d",
                "projection_cls": "mlp",
                "use_hd_transform": True,
                "with_learnable_separator": True,
            },
            "audio_embd_layer": audio_layer,
        },
        "audio_processor": {"name": "cascades", "config": conformer},
        "vision_lora": {"dp": 0.0, "layer": "layers.*((self_attn\\.(qkv_proj|o_proj))|(mlp\\.(gate_up|down)_proj))",
                        "lora_alpha": 16, "r": 8},
        "speech_lora": {"dp": 0.0, "layer": "((layers.*self_attn\\.(qkv|o)_proj)|(layers.*mlp\\.(gate_up|down)_proj))",
                        "lora_alpha": 16, "r": 8},
    }  # fmt: skip


def write_lora(out: Path, rank: int, seed: int) -> None:
    """A PEFT adapter like the checkpoint's vision-lora/speech-lora, over the tiny LM's projections."""
    import torch
    from safetensors.torch import save_file

    shapes = {
        "self_attn.qkv_proj": (HIDDEN, (HEADS + 2 * KV_HEADS) * HEAD_DIM),
        "self_attn.o_proj": (HEADS * HEAD_DIM, HIDDEN),
        "mlp.gate_up_proj": (HIDDEN, 2 * INTERMEDIATE),
        "mlp.down_proj": (INTERMEDIATE, HIDDEN),
    }
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(LAYERS):
        for module, (fan_in, fan_out) in shapes.items():
            prefix = f"base_model.model.model.layers.{layer}.{module}"
            # Scale 0.5 makes the adapters change greedy outputs, so tests can see that one was applied.
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(rank, fan_in, generator=gen) * 0.5
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(fan_out, rank, generator=gen) * 0.5
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "adapter_model.safetensors"))
    adapter_config = {
        "peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "lora_dropout": 0.0, "bias": "none",
        "target_modules": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"], "task_type": "CAUSAL_LM",
        "base_model_name_or_path": None, "fan_in_fan_out": False, "modules_to_save": None,
    }  # fmt: skip
    (out / "adapter_config.json").write_text(json.dumps(adapter_config, indent=1))


def write_shared_files(out: Path, dynamic_hd: int) -> None:
    """What the tiny and the full-size checkpoints share: remote code, tokenizer, processor and generation
    configs."""
    out.mkdir(parents=True, exist_ok=True)
    for code in (Path(__file__).parent / "tiny_model").glob("*_phi4mm_tiny.py"):
        shutil.copy(code, out / code.name)
    write_tokenizer(out)
    processor_config = {
        "auto_map": {"AutoProcessor": REMOTE_CODE_AUTO_MAP["AutoProcessor"]},
        "dynamic_hd": dynamic_hd,
        "audio_sampling_rate": PHI4MM.audio_sample_rate,
        "audio_compression_rate": PHI4MM.audio_compression_rate,
    }
    (out / "processor_config.json").write_text(json.dumps(processor_config, indent=1))
    generation_config = {"bos_token_id": 199999, "eos_token_id": [199999, 200020], "pad_token_id": 199999}
    (out / "generation_config.json").write_text(json.dumps(generation_config, indent=1))


def write_tiny_checkpoint(out_dir: str | Path, dynamic_hd: int = 1, lora_rank: int = 8) -> Path:
    """Write the checkpoint into ``out_dir`` (created if missing) and return its path."""
    out = Path(out_dir)
    write_shared_files(out, dynamic_hd)
    (out / "config.json").write_text(json.dumps(_model_config(), indent=1))
    write_lora(out / PHI4MM.vision_lora_dir, lora_rank, seed=1)
    write_lora(out / PHI4MM.speech_lora_dir, lora_rank, seed=2)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", help="Directory to write the checkpoint into.")
    parser.add_argument(
        "--full-size",
        action="store_true",
        help="Write the released Phi-4-multimodal architecture (for load_format=dummy on a GPU).",
    )
    parser.add_argument(
        "--dynamic-hd",
        type=int,
        default=None,
        help=f"Max HD crops per image (default 1, fast on CPU; --full-size: {PHI4MM.default_dynamic_hd}).",
    )
    parser.add_argument("--lora-rank", type=int, default=None, help="Rank of the tiny model's LoRA adapters.")
    parser.add_argument(
        "--layout",
        choices=["original", "transformers"],
        default="original",
        help="original: vLLM's Phi4MMForCausalLM (no weights); transformers: Phi4MultimodalForCausalLM.",
    )
    parser.add_argument(
        "--no-lora-weights",
        action="store_true",
        help="--full-size only: write the adapters' adapter_config.json but not their ~1.6 GB of weights.",
    )
    parser.add_argument(
        "--byte-tokenizer",
        action="store_true",
        help="Tiny model only: a byte-level tokenizer that spells any text (structured outputs need it).",
    )
    args = parser.parse_args(argv)
    if args.byte_tokenizer and args.full_size:
        parser.error("--byte-tokenizer goes with the tiny model (the full-size one has its own tokenizer)")
    if args.layout == "transformers":
        if args.dynamic_hd is not None:
            parser.error(
                "--layout transformers has no processor config: dynamic_hd is the job's engine.dynamic_hd"
            )
        from jobs import transformers_model

        if args.full_size:
            out = transformers_model.write_full_size_transformers_checkpoint(
                args.out_dir, not args.no_lora_weights
            )
        else:
            rank = 8 if args.lora_rank is None else args.lora_rank
            out = transformers_model.write_tiny_transformers_checkpoint(args.out_dir, rank)
            if args.byte_tokenizer:
                write_byte_tokenizer(out)
        print(f"wrote Phi-4-multimodal checkpoint (transformers layout) to {out}")
        return
    if args.full_size:
        if args.lora_rank is not None:
            parser.error("--lora-rank is the tiny model's: the full-size adapters have the released ranks")
        from jobs.full_size_model import write_full_size_checkpoint

        dynamic_hd = PHI4MM.default_dynamic_hd if args.dynamic_hd is None else args.dynamic_hd
        out = write_full_size_checkpoint(args.out_dir, dynamic_hd, lora_weights=not args.no_lora_weights)
        print(f"wrote full-size Phi-4-multimodal checkpoint to {out} (dynamic_hd={dynamic_hd})")
        return
    if args.no_lora_weights:
        parser.error("--no-lora-weights goes with --full-size (the tiny adapters are a few kB)")
    dynamic_hd = 1 if args.dynamic_hd is None else args.dynamic_hd
    out = write_tiny_checkpoint(args.out_dir, dynamic_hd, 8 if args.lora_rank is None else args.lora_rank)
    if args.byte_tokenizer:
        write_byte_tokenizer(out)
    print(f"wrote tiny Phi-4-multimodal checkpoint to {out} (dynamic_hd={dynamic_hd})")


if __name__ == "__main__":
    main()
