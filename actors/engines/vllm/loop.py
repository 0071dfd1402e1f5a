"""A continuous-batching driver around one in-process vLLM engine, shared by concurrent callers.

Ray Data hands a GPU actor several batches at once (threads); each thread submits its requests here and
waits. One loop thread owns the engine: it admits waiting requests, steps the engine and resolves each
request's future as it finishes, so a long generation from one batch never idles the engine while the
next batch waits. Works with any object that has vLLM's ``LLMEngine`` methods ``add_request``, ``step``
and ``has_unfinished_requests``.
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

logger = logging.getLogger(__name__)


@dataclass
class Submission:
    prompt: dict
    params: object
    lora_request: object | None
    alone: bool = False  # runs with nothing else in the engine (a row suspected of crashing it)
    future: Future = field(default_factory=Future)
    submitted: float = field(default_factory=time.perf_counter)
    admitted: float | None = None


@dataclass
class LoopStats:
    requests: int = 0
    rejected: int = 0
    steps: int = 0
    busy_s: float = 0.0
    max_in_flight: int = 0
    first_admitted: float | None = None  # perf_counter when the first request went in


class EngineLoop:
    def __init__(self, engine, on_engine_death: Callable[[BaseException], None] | None = None):
        self.engine = engine
        self.on_engine_death = on_engine_death or _exit_process
        self.stats = LoopStats()
        self.work = None  # actors.engines.vllm.stats.EngineWork, told each step's wall time
        self._ids = itertools.count()
        self._waiting: deque[Submission] = deque()
        self._running: dict[str, Submission] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)
        self._thread.start()

    def submit(self, prompt: dict, params, lora_request=None, alone: bool = False) -> Future:
        sub = Submission(prompt, params, lora_request, alone)
        with self._lock:
            self._waiting.append(sub)
        self._wake.set()
        return sub.future

    def _next_admissible(self) -> Submission | None:
        with self._lock:
            if not self._waiting:
                return None
            sub = self._waiting[0]
            if self._running and (sub.alone or any(s.alone for s in self._running.values())):
                return None
            return self._waiting.popleft()

    def _admit(self) -> None:
        # add_request runs the checkpoint's processor (seconds for an image on a CPU): outside the lock,
        # so submitting threads never wait on it. Only this thread touches _running.
        while (sub := self._next_admissible()) is not None:
            request_id = str(next(self._ids))
            try:
                self.engine.add_request(request_id, sub.prompt, sub.params, lora_request=sub.lora_request)
            except Exception as e:  # vLLM validates each request here: only this one fails
                self.stats.rejected += 1
                sub.future.set_exception(e)
                continue
            sub.admitted = time.perf_counter()
            if self.stats.first_admitted is None:
                self.stats.first_admitted = sub.admitted
            self._running[request_id] = sub
            self.stats.requests += 1
        self.stats.max_in_flight = max(self.stats.max_in_flight, len(self._running))

    def _run(self) -> None:
        while True:
            self._admit()
            if not self.engine.has_unfinished_requests():
                self._wake.wait(0.05)
                self._wake.clear()
                continue
            started = time.perf_counter()
            try:
                outputs = self.engine.step()
            except BaseException as e:  # the engine is dead: nothing in flight can finish here
                self.on_engine_death(e)
                return
            elapsed = time.perf_counter() - started
            self.stats.steps += 1
            self.stats.busy_s += elapsed
            if self.work is not None:
                self.work.step_timed(elapsed)
            for out in outputs:
                if out.finished:
                    sub = self._running.pop(out.request_id, None)
                    if sub is not None:
                        sub.future.set_result(
                            (out, sub.admitted - sub.submitted, time.perf_counter() - sub.submitted)
                        )


def _exit_process(error: BaseException) -> None:
    # A dead engine cannot be revived in this process. Exiting makes Ray restart the actor and retry the
    # batches it held, instead of every later batch failing against a dead engine.
    logger.critical(
        "vLLM engine died (%s: %s); exiting so that Ray restarts this actor", type(error).__name__, error
    )
    os._exit(70)
