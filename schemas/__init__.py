"""Typed contracts of phi4mm-batch: job config, row schemas and model facts.

Only pydantic and pyarrow are imported here: never torch, vllm or ray.
"""

from schemas.model import PHI4MM, Phi4MMFacts

__all__ = ["PHI4MM", "Phi4MMFacts"]
