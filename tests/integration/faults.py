"""Fault injection for crash-recovery tests, loaded in GPU actors through ``engine.init_hook``.

The engine stays real; only a hard crash is added where a prompt carries the word POISON, as a
segfault or an out-of-memory kill inside vLLM would end the process."""

import os


def poison_kills_engine() -> None:
    from vllm.v1.engine.llm_engine import LLMEngine

    from jobs.tiny_vision import shrink_siglip

    shrink_siglip()
    original = LLMEngine.add_request

    def add_request(self, request_id, prompt, *args, **kwargs):
        if isinstance(prompt, dict) and "POISON" in str(prompt.get("prompt", "")):
            os._exit(1)
        return original(self, request_id, prompt, *args, **kwargs)

    LLMEngine.add_request = add_request


def stall_on_marker() -> None:
    """A prompt carrying the word STALL stops in the engine (as a long generation would) after leaving a
    file ``stalled-<Ray node id>-<pid>`` in $FAULTS_DIR, until the test writes ``release`` there: the test
    can then end the process the way the cluster would, with that row in the engine."""
    import time
    from pathlib import Path

    import ray
    from vllm.v1.engine.llm_engine import LLMEngine

    from jobs.tiny_vision import shrink_siglip

    shrink_siglip()
    original = LLMEngine.add_request
    faults = Path(os.environ["FAULTS_DIR"])

    def add_request(self, request_id, prompt, *args, **kwargs):
        if isinstance(prompt, dict) and "STALL" in str(prompt.get("prompt", "")):
            (faults / f"stalled-{ray.get_runtime_context().get_node_id()}-{os.getpid()}").touch()
            while not (faults / "release").exists():
                time.sleep(0.05)
        return original(self, request_id, prompt, *args, **kwargs)

    LLMEngine.add_request = add_request
