"""Config class of phi4mm-batch's tiny Phi-4-multimodal checkpoint (remote code, model_type "phi4mm").

Written from what vLLM's Phi4MMForCausalLM (vllm/model_executor/models/phi4mm*.py)
reads; it is not Microsoft's file.
"""

from transformers import PretrainedConfig


class Phi4MMTinyConfig(PretrainedConfig):
    model_type = "phi4mm"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(
        self,
        vocab_size=200064,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        hidden_act="silu",
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        rope_parameters=None,
        rope_scaling=None,
        original_max_position_embeddings=None,
        partial_rotary_factor=1.0,
        tie_word_embeddings=True,
        embd_layer=None,
        img_processor=None,
        audio_processor=None,
        vision_lora=None,
        speech_lora=None,
        bos_token_id=199999,
        eos_token_id=199999,
        pad_token_id=199999,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads
        self.hidden_act = hidden_act
        self.max_position_embeddings = max_position_embeddings
        self.rms_norm_eps = rms_norm_eps
        self.rope_theta = rope_theta
        # The released config.json has the legacy `rope_scaling` (LongRoPE) and no `rope_parameters`.
        default_rope = {"rope_type": "default", "rope_theta": rope_theta}
        self.rope_parameters = rope_parameters or rope_scaling or default_rope
        if original_max_position_embeddings is not None:
            # Set before PretrainedConfig.__init__, whose RoPE standardisation copies it into rope_parameters
            # (vLLM's LongRoPE reads it there); unset, it would copy max_position_embeddings instead.
            self.original_max_position_embeddings = original_max_position_embeddings
        self.partial_rotary_factor = partial_rotary_factor
        self.embd_layer = embd_layer or {}
        # None => vLLM assumes "siglip-so400m-patch14-448" geometry
        self.img_processor = img_processor
        self.audio_processor = audio_processor or {}
        self.vision_lora = vision_lora
        self.speech_lora = speech_lora
        super().__init__(
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )
