"""vLLM's repeated warnings (per request, per module) appear once per process; other lines are untouched."""

import importlib.util
import logging
from pathlib import Path

import pytest

from actors.log_once import NOTE, REPEATED_WARNINGS, OncePerProcess, show_repeated_warnings_once


class Collect(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(record.getMessage())


@pytest.fixture
def collected():
    """A handler on each emitting logger, and the loggers as they were afterwards (filters included)."""
    handler = Collect()
    loggers = [logging.getLogger(name) for name in REPEATED_WARNINGS]
    before = [(lg.filters[:], lg.propagate) for lg in loggers]
    for lg in loggers:
        # a filter installed earlier in this process (the vLLM plugin, registered by an engine test)
        # has already seen its warnings once: the test starts from loggers without one
        lg.filters[:] = [f for f in lg.filters if not isinstance(f, OncePerProcess)]
        lg.addHandler(handler)
    yield handler
    for lg, (filters, propagate) in zip(loggers, before, strict=True):
        lg.removeHandler(handler)
        lg.filters[:], lg.propagate = filters, propagate


def test_the_templates_are_vllms_own():
    """The filter matches what vLLM 0.32 emits, from the modules whose loggers it watches: a vLLM that
    rewords them fails here rather than flooding logs again unnoticed."""
    for name, templates in REPEATED_WARNINGS.items():
        source = Path(importlib.util.find_spec(name).origin).read_text()
        flat = "".join(part.strip().strip('"') for part in source.splitlines())  # joins wrapped literals
        for template in templates:
            assert template in flat, (name, template)


def test_a_repeated_warning_appears_once_with_a_note(collected):
    show_repeated_warnings_once()
    show_repeated_warnings_once()  # idempotent: one filter per logger
    cpu = logging.getLogger("vllm.v1.worker.cpu_worker")
    assert sum(isinstance(f, OncePerProcess) for f in cpu.filters) == 1
    message = "CPU backend doesn't allow to use `torch.set_num_threads` after the thread binding, skip it."
    cpu.warning(message)
    cpu.warning(message)
    cpu.warning("libtcmalloc is not found in LD_PRELOAD.")  # another warning of the same logger
    cpu.warning("libtcmalloc is not found in LD_PRELOAD.")  # is never held back
    lora = logging.getLogger("vllm.lora.model_manager")
    for module in ("vision.blocks.0.attn", "vision.blocks.1.attn", "audio.conv"):
        lora.warning(
            "Regarding %s, no matching PunicaWrapper is found; %s will be ignored.", "Phi4MM", module
        )
    assert collected.lines == [
        message + NOTE,
        "libtcmalloc is not found in LD_PRELOAD.",
        "libtcmalloc is not found in LD_PRELOAD.",
        "Regarding Phi4MM, no matching PunicaWrapper is found; vision.blocks.0.attn will be ignored." + NOTE,
    ]
