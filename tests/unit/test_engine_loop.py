"""The continuous-batching loop with a scripted engine (the real one: tests/integration)."""

import threading
import time
from types import SimpleNamespace

import pytest

from actors.engines.vllm.loop import EngineLoop


class ScriptedEngine:
    """Finishes a request after `steps` steps (its prompt's value); rejects prompts marked bad."""

    def __init__(self):
        self.live: dict[str, int] = {}
        self.groups_per_step: list[set] = []
        self.lock = threading.Lock()
        self.die_at_step = None
        self.step_count = 0

    def add_request(self, request_id, prompt, params, lora_request=None):
        if prompt.get("bad"):
            raise ValueError("rejected by validation")
        self.live[request_id] = (prompt["steps"], lora_request)

    def has_unfinished_requests(self):
        return bool(self.live)

    def step(self):
        self.step_count += 1
        if self.die_at_step == self.step_count:
            raise RuntimeError("engine core died")
        self.groups_per_step.append({lora for _, lora in self.live.values()})
        done = []
        for rid, (left, lora) in list(self.live.items()):
            if left <= 1:
                del self.live[rid]
                done.append(SimpleNamespace(request_id=rid, finished=True))
            else:
                self.live[rid] = (left - 1, lora)
        time.sleep(0.001)
        return done


def test_requests_from_concurrent_callers_share_steps():
    engine = ScriptedEngine()
    loop = EngineLoop(engine)
    long = loop.submit({"steps": 50}, None)
    time.sleep(0.01)
    shorts = [loop.submit({"steps": 2}, None) for _ in range(5)]
    for f in shorts:
        f.result(timeout=5)
    assert not long.done()  # the short batch finished while the long request kept running
    long.result(timeout=5)
    assert loop.stats.max_in_flight >= 6 and loop.stats.requests == 6


def test_a_rejected_request_fails_alone():
    loop = EngineLoop(ScriptedEngine())
    good, bad = loop.submit({"steps": 1}, None), loop.submit({"bad": True}, None)
    with pytest.raises(ValueError, match="rejected"):
        bad.result(timeout=5)
    out, queued_s, engine_s = good.result(timeout=5)
    assert out.finished and 0 <= queued_s <= engine_s
    assert loop.stats.rejected == 1


def test_engine_death_is_reported():
    engine = ScriptedEngine()
    engine.die_at_step = 2
    died = threading.Event()
    loop = EngineLoop(engine, on_engine_death=lambda e: died.set())
    loop.submit({"steps": 5}, None)
    assert died.wait(5)


def test_a_request_submitted_alone_never_shares_a_step():
    engine = ScriptedEngine()
    loop = EngineLoop(engine)
    futures = [loop.submit({"steps": 3}, None, f"r{i}", alone=(i == 2)) for i in range(5)]
    for f in futures:
        f.result(timeout=5)
    solo_steps = [g for g in engine.groups_per_step if "r2" in g]
    assert solo_steps and all(g == {"r2"} for g in solo_steps)
