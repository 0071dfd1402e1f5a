"""vLLM warnings that repeat without news, shown once per process instead of per request or per module.

On the CPU backend vLLM replaces ``torch.set_num_threads`` with a function that only warns, and its
renderer calls it around every prompt: a 2,000-row run printed the same line 2,008 times. With LoRA on,
vLLM warns once per model module that has no LoRA kernel (the vision and audio towers): ~100 lines per
engine start, each naming another module of the same towers. Each such warning keeps its first
occurrence, marked so that a reader knows later ones are hidden; every other log line is untouched.

``show_repeated_warnings_once()`` installs the filter on the loggers that emit them; the vLLM plugin
(``actors.engines.vllm.plugin.register``) calls it, so it runs in every process that builds an engine.
"""

from __future__ import annotations

import logging
import threading

# emitting logger -> start of the message template (record.msg, before its arguments are filled in)
REPEATED_WARNINGS = {
    # vllm/v1/worker/cpu_worker.py, skip_set_num_threads: once per request (vLLM's renderer)
    "vllm.v1.worker.cpu_worker": ("CPU backend doesn't allow to use `torch.set_num_threads`",),
    # vllm/lora/model_manager.py, _create_lora_modules: once per module without a LoRA kernel
    "vllm.lora.model_manager": ("Regarding %s, no matching PunicaWrapper",),
}
NOTE = " (shown once per process: later warnings like this one are not)"


class OncePerProcess(logging.Filter):
    """Lets the first record of each listed message template through, with ``NOTE`` appended, and drops
    the rest; records of other templates pass unchanged."""

    def __init__(self, templates: tuple[str, ...]):
        super().__init__()
        self.templates = templates
        self._seen: set[str] = set()
        self._lock = threading.Lock()  # the engine loop and Ray's batch threads both log

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.msg if isinstance(record.msg, str) else ""
        template = next((t for t in self.templates if message.startswith(t)), None)
        if template is None:
            return True
        with self._lock:
            if template in self._seen:
                return False
            self._seen.add(template)
        record.msg = message + NOTE
        return True


def show_repeated_warnings_once() -> None:
    """Install ``OncePerProcess`` on each logger of ``REPEATED_WARNINGS`` (once, however often called).
    A logger's own filters see what it emits whatever handlers vLLM configures."""
    for name, templates in REPEATED_WARNINGS.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, OncePerProcess) for f in logger.filters):
            logger.addFilter(OncePerProcess(templates))
