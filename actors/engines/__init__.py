"""The engines behind the GPU stage: a folder per backend, the contract and adapters they share, and the
registry that picks one.

- ``contract``: ``EngineRequest`` / ``EngineResult`` / the ``Engine`` protocol the GPU stage talks to.
- ``adapters``: where each LoRA adapter lives on this node (the checkpoint's, the job's, remote ones copied).
- ``vllm/``: ``engine`` (vLLM), ``phi4mm`` (its Phi4MM taking prepared media, registered by the vLLM
  general plugin ``plugin``), ``cpu_lora`` (its CPU LoRA ops fixed), ``loop`` (the continuous-batching
  loop), ``annotation`` (structured outputs), ``stats`` (useful-work figures).
- ``transformers/``: ``engine`` (transformers' Phi4MultimodalForCausalLM with PEFT adapters, batched
  generate), ``annotation`` (structured outputs), ``patches`` (its audio windowing fixed).

``BACKENDS`` names, per ``engine.backend`` (``schemas.job.EngineConfig``), the module holding its class
``Engine(config)`` (it meets the ``Engine`` protocol), the packages it needs and the extra that installs
them. Importing this package is cheap: a backend is imported when an engine is built, and a missing
package then names the extra to install.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from contextlib import contextmanager
from typing import NamedTuple

from actors.engines.contract import Engine
from schemas.job import JobConfig


class Backend(NamedTuple):
    module: str  # holds the class ``Engine(config)``
    install: str  # what to pip install for ``needs``
    needs: frozenset[str]  # the heavy packages it imports (top-level names)


BACKENDS = {
    "vllm": Backend(
        "actors.engines.vllm.engine",
        "'phi4mm-batch[gpu]' (CUDA) or 'phi4mm-batch[cpu]' (no GPU)",
        frozenset({"vllm", "torch"}),
    ),
    "transformers": Backend(
        "actors.engines.transformers.engine",
        "'phi4mm-batch[transformers]'",
        frozenset({"transformers", "peft", "torch", "xgrammar"}),
    ),
}


@contextmanager
def _naming_the_extra(backend: str) -> Iterator[None]:
    """A missing package of ``backend``'s stays a ``ModuleNotFoundError`` whose message names the extra."""
    try:
        yield
    except ModuleNotFoundError as e:
        spec = BACKENDS[backend]
        if (e.name or "").split(".")[0] not in spec.needs:
            raise
        raise ModuleNotFoundError(
            f"engine.backend {backend!r} needs the package {e.name!r}, which is not installed. "
            f"Try pip install {spec.install}.",
            name=e.name,
        ) from e


def engine_class(backend: str) -> type:
    """The ``Engine`` class of a backend, its module imported now."""
    if backend not in BACKENDS:
        raise ValueError(f"engine.backend {backend!r} is not one of {sorted(BACKENDS)}.")
    with _naming_the_extra(backend):
        return importlib.import_module(BACKENDS[backend].module).Engine


def build_engine(config: JobConfig) -> Engine:
    """The job's engine, started (in the GPU actor)."""
    backend = config.engine.backend
    cls = engine_class(backend)
    with _naming_the_extra(backend):  # a backend may import its engine only when it builds one (vLLM)
        return cls(config)
