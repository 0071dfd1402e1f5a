"""The transformers backend (``engine.backend: transformers``): see ``actors.engines``."""
