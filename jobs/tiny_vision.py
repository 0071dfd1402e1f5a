"""Test-speed hook: shrink the SigLIP tower that vLLM's Phi4MM code hard-codes.

vLLM builds the full SigLIP-so400m tower (27 layers x 1152 wide) whatever the checkpoint's config says,
and on a CPU one image through it costs seconds. Fast tests and benchmarks of the plumbing set
``engine.init_hook: jobs.tiny_vision:shrink_siglip`` so each GPU actor swaps in a 2-layer, 64-wide tower
with the same 448 px / 14 px geometry: token counts, crops and masks are unchanged, only the encoder's
cost is. The engine must run in the actor's own process (``engine.executor: uni``) for the patch to
apply. At least one test runs without it, on the unmodified tower.
"""

from __future__ import annotations

from schemas.model import PHI4MM


def shrink_siglip() -> None:
    import vllm.model_executor.models.phi4mm as phi4mm
    from transformers import SiglipVisionConfig
    from vllm.model_executor.models.idefics2_vision_model import Idefics2VisionTransformer

    def tiny_navit_vision_model(layer_idx: int = -1, **kwargs):
        config = SiglipVisionConfig(
            hidden_size=64, intermediate_size=128, num_attention_heads=2, num_hidden_layers=2,
            image_size=PHI4MM.crop_size, patch_size=PHI4MM.patch_size, model_type="siglip_vision_model", **kwargs,
        )  # fmt: skip
        layers = config.num_hidden_layers + layer_idx + 1 if layer_idx < 0 else layer_idx + 1
        return Idefics2VisionTransformer(
            config=config, require_post_norm=False, num_hidden_layers_override=layers
        )

    phi4mm.get_navit_vision_model = tiny_navit_vision_model
