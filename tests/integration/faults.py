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
