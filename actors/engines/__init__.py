"""The engines behind the GPU stage, one module per backend, and the contract they share.

- ``contract``: ``EngineRequest`` / ``EngineResult`` / the ``Engine`` protocol the GPU stage talks to.
- ``vllm_engine``: vLLM (``vllm_phi4mm``: its Phi4MM taking prepared media, registered by the vLLM
  general plugin ``vllm_plugin``; ``vllm_cpu_lora``: its CPU LoRA ops fixed; ``vllm_loop``: the
  continuous-batching loop).
- ``transformers_engine``: transformers' Phi4MultimodalForCausalLM with PEFT adapters, batched generate.

A backend is the module ``actors.engines.<backend>_engine`` with a class ``Engine(config)`` that meets
the ``Engine`` protocol, chosen by ``engine.backend`` (``schemas.job.EngineConfig``). Importing this
package is cheap: a backend is imported when an engine is built.
"""

from __future__ import annotations

import importlib

from actors.engines.contract import Engine
from schemas.job import JobConfig


def engine_class(backend: str) -> type:
    """The ``Engine`` class of a backend's module, imported now."""
    return importlib.import_module(f"actors.engines.{backend}_engine").Engine


def build_engine(config: JobConfig) -> Engine:
    """The job's engine, started (in the GPU actor)."""
    return engine_class(config.engine.backend)(config)
