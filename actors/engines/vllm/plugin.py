"""vLLM general plugin: registers ``Phi4MMPreparedForCausalLM`` (``actors.engines.vllm.phi4mm``) with vLLM,
on the CPU backend fixes its LoRA ops for rows without an adapter (``actors.engines.vllm.cpu_lora``), and shows
vLLM's per-request and per-module repeated warnings once per process (``actors.log_once``).

vLLM calls ``register`` in every process it starts (entry point ``vllm.general_plugins`` in
pyproject.toml), which multi-process executors need; the vLLM ``Engine`` also calls it before building its
engine, so it works where the project is not installed. Registration is lazy: nothing heavy is imported.
"""

from __future__ import annotations

PREPARED_ARCHITECTURE = "Phi4MMPreparedForCausalLM"


def register() -> None:
    from vllm import ModelRegistry
    from vllm.platforms import current_platform

    from actors.log_once import show_repeated_warnings_once

    show_repeated_warnings_once()

    if PREPARED_ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(
            PREPARED_ARCHITECTURE, f"actors.engines.vllm.phi4mm:{PREPARED_ARCHITECTURE}"
        )
    if current_platform.is_cpu():
        from actors.engines.vllm.cpu_lora import patch_cpu_lora_ops

        patch_cpu_lora_ops()
