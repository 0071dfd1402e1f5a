"""Fix for vLLM 0.32's CPU LoRA ops: a token without an adapter must get no LoRA delta.

vLLM's torch LoRA ops (``vllm.lora.ops.torch_ops``, used by the CPU backend's punica wrapper) gather each
token's adapter weights with ``weights[lora_indices]``; a token without an adapter has index -1, which
torch reads as the *last* adapter. So on the CPU a base (text) row that shares an engine step with
adapter rows was silently computed with an adapter. GPU kernels skip index -1 and are not touched.

The shrink op (x @ A) is the first of the two LoRA products, and the expand op (… @ B) only adds what
shrink wrote: zeroing shrink's output for index -1 makes the whole LoRA delta zero for those tokens.
``patch_cpu_lora_ops`` is applied by the vLLM plugin (``actors.engines.vllm.plugin``) in every vLLM process on
the CPU backend.
"""

from __future__ import annotations

import functools

_PATCHED = "_phi4mm_batch_masked"


def _masked_shrink(shrink):
    @functools.wraps(shrink)
    def bgmv_shrink(inputs, lora_a_weights, output_tensor, lora_indices_tensor, scaling=1.0):
        base = lora_indices_tensor < 0
        shrink(inputs, lora_a_weights, output_tensor, lora_indices_tensor.clamp(min=0), scaling)
        if base.any():
            output_tensor[base, : lora_a_weights.shape[-2]] = 0  # rank columns: what shrink wrote
        return output_tensor

    setattr(bgmv_shrink, _PATCHED, True)
    return bgmv_shrink


def patch_cpu_lora_ops() -> None:
    """Replace ``bgmv_shrink`` where the CPU punica wrapper and ``sgmv_shrink`` look it up. Idempotent."""
    from vllm.lora.ops.torch_ops import lora_ops
    from vllm.lora.punica_wrapper import punica_cpu

    if getattr(lora_ops.bgmv_shrink, _PATCHED, False):
        return
    masked = _masked_shrink(lora_ops.bgmv_shrink)
    lora_ops.bgmv_shrink = masked  # sgmv_shrink (prefill) calls it through this module's globals
    punica_cpu.bgmv_shrink = masked  # decode steps call the name punica_cpu imported
