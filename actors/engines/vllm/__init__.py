"""The vLLM backend (``engine.backend: vllm``): see ``actors.engines``."""
