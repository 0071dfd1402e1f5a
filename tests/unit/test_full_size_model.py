"""The full-size checkpoint (jobs/full_size_model.py) describes the released Phi-4-multimodal exactly.

Fast: the adapters' weights are not written, and no vLLM engine or model is built.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from jobs import full_size_model as fsm
from jobs.make_tiny_model import REMOTE_CODE_AUTO_MAP, main
from schemas.model import PHI4MM

TARGET_MODULES = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]


def _json(path: Path) -> dict:
    return json.loads(path.read_text())


@pytest.fixture(scope="module")
def full_size(tmp_path_factory) -> Path:
    return fsm.write_full_size_checkpoint(tmp_path_factory.mktemp("full-phi4mm"), lora_weights=False)


@pytest.fixture(scope="module")
def config(full_size) -> dict:
    return _json(full_size / "config.json")


def test_released_config_is_the_released_file_byte_for_byte():
    text = json.dumps(fsm.released_config(), indent=2) + "\n"
    assert hashlib.sha256(text.encode()).hexdigest() == fsm.RELEASED_CONFIG_SHA256


def test_written_config_is_the_released_one_but_for_auto_map(config):
    released = fsm.released_config()
    assert list(config) == list(released)
    assert [key for key in config if config[key] != released[key]] == ["auto_map"]
    assert config["auto_map"] == REMOTE_CODE_AUTO_MAP


def test_language_model(config):
    sizes = ["hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"]
    assert [config[key] for key in sizes] == [3072, 8192, 32, 24]
    assert config["num_key_value_heads"] == 8
    assert config["vocab_size"] == 200064
    assert config["architectures"] == [PHI4MM.architecture] and config["model_type"] == "phi4mm"
    assert (config["max_position_embeddings"], config["original_max_position_embeddings"]) == (131072, 4096)
    assert (config["partial_rotary_factor"], config["rope_theta"]) == (0.75, 10000.0)
    assert config["sliding_window"] == 262144
    assert config["tie_word_embeddings"] is True and config["torch_dtype"] == "bfloat16"


def test_longrope(config):
    rope = config["rope_scaling"]
    assert rope["type"] == "longrope"
    rotary_half = 3072 // 24 * 3 // 4 // 2  # head_dim 128, partial_rotary_factor 0.75
    assert len(rope["long_factor"]) == len(rope["short_factor"]) == rotary_half == 48
    assert rope["long_factor"][:3] == [1, 1.118320672, 1.250641126]
    assert rope["long_factor"][-3:] == [33.5, 44.16, 47.77]
    assert set(rope["short_factor"]) == {1.0}


def test_audio_encoder_and_embeddings(config):
    audio = config["audio_processor"]
    assert audio["name"] == "cascades"
    enc = audio["config"]
    assert (enc["attention_dim"], enc["attention_heads"], enc["linear_units"]) == (1024, 16, 1536)
    assert enc["num_blocks"] == 24
    assert enc["nemo_conv_settings"] == {"conv_channels": 1024} and enc["input_size"] == 80
    assert enc["relative_attention_bias_args"] == {"t5_bias_max_distance": 500, "type": "t5"}
    assert enc["time_reduction"] == 8 == config["embd_layer"]["audio_embd_layer"]["compression_rate"]
    assert config["embd_layer"]["embedding_cls"] == "image_audio"
    image = config["embd_layer"]["image_embd_layer"]
    assert image["crop_size"] == 448 and image["hd_transform_order"] == "sub_glb"
    assert "img_processor" not in config  # vLLM: None -> SigLIP-so400m at 448 px


RELEASED_ADAPTERS = [(fsm.VISION_LORA, 256, 512, 0.0), (fsm.SPEECH_LORA, 320, 640, 0.01)]


@pytest.mark.parametrize(("spec", "rank", "alpha", "dropout"), RELEASED_ADAPTERS)
def test_adapters(full_size, config, spec, rank, alpha, dropout):
    folder = full_size / PHI4MM.adapter_dir(spec.adapter)
    adapter = _json(folder / "adapter_config.json")
    assert (adapter["r"], adapter["lora_alpha"], adapter["lora_dropout"]) == (rank, alpha, dropout)
    assert adapter["target_modules"] == TARGET_MODULES
    assert (adapter["peft_type"], adapter["task_type"], adapter["bias"]) == ("LORA", "CAUSAL_LM", "none")
    section = {"dp": dropout, "layer": spec.layer, "lora_alpha": alpha, "r": rank}
    assert config[f"{spec.adapter}_lora"] == section
    assert not (folder / "adapter_model.safetensors").exists()  # lora_weights=False


def test_adapter_configs_are_the_released_files(full_size):
    speech = (full_size / PHI4MM.speech_lora_dir / "adapter_config.json").read_bytes()
    assert hashlib.sha256(speech).hexdigest() == fsm.RELEASED_SPEECH_ADAPTER_CONFIG_SHA256
    assert (full_size / PHI4MM.vision_lora_dir / "adapter_config.json").stat().st_size == 464  # released size


def test_lora_rank_bound(full_size):
    from actors.engines.adapters import lora_rank_of

    dirs = {a: full_size / PHI4MM.adapter_dir(a) for a in ("vision", "speech")}
    assert lora_rank_of(dirs) == PHI4MM.max_lora_rank == 320


def test_the_released_adapter_configs_pass_the_custom_adapter_checks(full_size):
    from schemas.adapters import check_config

    ranks = {}
    for adapter in ("vision", "speech"):
        text = (full_size / PHI4MM.adapter_dir(adapter) / "adapter_config.json").read_text()
        ranks[adapter], targets = check_config(f"model.adapters.{adapter}", "released", text)  # no JobError
        assert set(targets) == {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"}
    assert ranks["speech"] == PHI4MM.max_lora_rank


@pytest.mark.parametrize("rank", [256, 320])
def test_lora_tensor_shapes(rank):
    shapes = fsm.lora_tensor_shapes(rank)
    assert len(shapes) == 32 * 4 * 2
    name = "base_model.model.model.layers.{}.{}.lora_{}.weight".format
    expected = {  # module: (lora_A, lora_B)
        "self_attn.qkv_proj": ((rank, 3072), (5120, rank)),
        "self_attn.o_proj": ((rank, 3072), (3072, rank)),
        "mlp.gate_up_proj": ((rank, 3072), (16384, rank)),
        "mlp.down_proj": ((rank, 8192), (3072, rank)),
    }
    for layer in (0, 31):
        for module, (a, b) in expected.items():
            assert (shapes[name(layer, module, "A")], shapes[name(layer, module, "B")]) == (a, b)


def test_remote_config_keeps_longrope(full_size):
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(full_size, trust_remote_code=True)
    rope = cfg.rope_parameters
    assert rope["rope_type"] == "longrope"
    # vLLM's LongRoPE reads it from here; without the config class's fix it would be 131072
    assert rope["original_max_position_embeddings"] == 4096
    assert rope["partial_rotary_factor"] == 0.75 and len(rope["long_factor"]) == 48
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_key_value_heads) == (3072, 32, 8)


def test_processor_and_tokenizer_load(full_size):
    from transformers import AutoProcessor, AutoTokenizer

    from actors.tokens import num_image_tokens

    processor = AutoProcessor.from_pretrained(str(full_size), trust_remote_code=True)
    assert processor.image_processor.dynamic_hd == PHI4MM.default_dynamic_hd == 36
    assert processor.audio_processor.sampling_rate == PHI4MM.audio_sample_rate
    tokenizer = AutoTokenizer.from_pretrained(str(full_size), trust_remote_code=True)  # as vLLM loads it
    for tok in (processor.tokenizer, tokenizer):
        tags = [PHI4MM.image_tag(1), PHI4MM.audio_tag(1), PHI4MM.assistant_tag, PHI4MM.end_tag]
        assert tok.convert_tokens_to_ids(tags) == [200030, 200040, 200019, 200020]
    # 1920x1080 at dynamic_hd 36: a 5x3 crop grid and 3918 tokens, as vLLM's Phi4MMProcessingInfo counts them
    assert processor.image_processor._target(1920, 1080, 36) == (5 * 448, 3 * 448)
    assert num_image_tokens(1920, 1080, processor.image_processor.dynamic_hd) == 3918


def test_cli(tmp_path):
    main([str(tmp_path / "default"), "--full-size", "--no-lora-weights"])
    assert _json(tmp_path / "default" / "processor_config.json")["dynamic_hd"] == 36
    main([str(tmp_path / "hd4"), "--full-size", "--no-lora-weights", "--dynamic-hd", "4"])
    assert _json(tmp_path / "hd4" / "processor_config.json")["dynamic_hd"] == 4
    assert _json(tmp_path / "hd4" / "config.json")["num_hidden_layers"] == 32
    with pytest.raises(SystemExit):
        main([str(tmp_path / "bad"), "--full-size", "--lora-rank", "8"])
    with pytest.raises(SystemExit):
        main([str(tmp_path / "bad"), "--no-lora-weights"])
