"""What a vLLM engine did with its steps: useful-work figures from vLLM's own per-step statistics.

nvidia-smi's "busy" counts any kernel running; it read 93% on an 80 GB card while two engines each held
too little KV cache to run the requests they were sent, and rows/s fell 27%. These figures say whether the
work was useful: the KV cache's size in tokens, requests running against waiting, preemptions (a request
thrown out of the cache and recomputed later), prefix and media cache hits, prompt and generated tokens per
second of engine step, and how much of the engine's time went inside steps.

``EngineWork`` is handed to vLLM's stat-logger manager (``attach``), which calls ``record`` once per engine
step with that step's ``SchedulerStats``, ``IterationStats`` and media-cache stats; ``step_timed`` adds the
step's wall time, measured by the loop that stepped it (``actors.engines.vllm.loop``). Plain class: a unit
test feeds it vLLM's real stats objects without an engine. vLLM itself is not imported here.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class EngineWork:
    kv_cache_tokens: int = 0  # what the KV cache holds, all requests together (blocks x block size)
    steps: int = 0
    prompt_tokens: int = 0  # prompt tokens whose prefill finished (counted when the first token comes)
    cached_prompt_tokens: int = 0  # of those, read from the prefix cache instead of computed
    generation_tokens: int = 0
    preemptions: int = 0
    running_sum: int = 0  # per step: requests running, waiting (for the step-weighted means)
    waiting_sum: int = 0
    running_max: int = 0
    waiting_max: int = 0
    kv_usage_max: float = 0.0
    prefix_queries: int = 0  # prefix cache: prompt tokens looked up, found
    prefix_hits: int = 0
    media_queries: int = 0  # media (encoder input) cache: items looked up, found
    media_hits: int = 0
    step_s: float = 0.0  # wall time inside steps (step_timed)
    prefill_step_s: float = 0.0  # of which in steps that computed prompt tokens
    _last_prefill: bool = field(default=False, repr=False)

    # vLLM's StatLoggerManager calls these on every logger it holds
    def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx: int = 0) -> None:
        self._last_prefill = False
        if scheduler_stats is not None:
            self.steps += 1
            running, waiting = scheduler_stats.num_running_reqs, scheduler_stats.num_waiting_reqs
            self.running_sum += running
            self.waiting_sum += waiting
            self.running_max = max(self.running_max, running)
            self.waiting_max = max(self.waiting_max, waiting)
            self.kv_usage_max = max(self.kv_usage_max, scheduler_stats.kv_cache_usage)
            prefix = scheduler_stats.prefix_cache_stats
            if prefix is not None:
                self.prefix_queries += prefix.queries
                self.prefix_hits += prefix.hits
            details = scheduler_stats.iteration_details
            if details is not None:
                self._last_prefill = details.num_ctx_tokens > 0
        if iteration_stats is not None:
            prompt = iteration_stats.prompt_token_stats
            self.prompt_tokens += prompt.total
            self.cached_prompt_tokens += prompt.cached_tokens
            self.generation_tokens += iteration_stats.num_generation_tokens
            self.preemptions += iteration_stats.num_preempted_reqs
            self._last_prefill = self._last_prefill or prompt.total > 0
        if mm_cache_stats is not None:
            self.media_queries += mm_cache_stats.queries
            self.media_hits += mm_cache_stats.hits

    def log(self) -> None:
        pass

    def log_engine_initialized(self) -> None:
        pass

    def record_sleep_state(self, is_awake: int, level: int) -> None:
        pass

    def record_admission_rejection(self, reason: str) -> None:
        pass

    def reset(self) -> None:
        """Every count back to zero (after the engine's warm-up request), the cache size kept."""
        self.__dict__.update(EngineWork(kv_cache_tokens=self.kv_cache_tokens).__dict__)

    def step_timed(self, seconds: float) -> None:
        """The wall time of the step ``record`` was last called for."""
        self.step_s += seconds
        if self._last_prefill:
            self.prefill_step_s += seconds

    def figures(self, engine_s: float) -> dict:
        """The run summary's ``work`` for this engine; ``engine_s``: wall time since the engine took its
        first request (the share of it spent inside steps says how often the engine waited for input)."""
        steps = max(self.steps, 1)
        return {
            "kv_cache_tokens": self.kv_cache_tokens,
            "steps": self.steps,
            "running_mean": round(self.running_sum / steps, 1),
            "running_max": self.running_max,
            "waiting_mean": round(self.waiting_sum / steps, 1),
            "waiting_max": self.waiting_max,
            "preemptions": self.preemptions,
            "kv_cache_usage_max": round(self.kv_usage_max, 3),
            "prefix_cache_hit_rate": _rate(self.prefix_hits, self.prefix_queries),
            "media_cache_hit_rate": _rate(self.media_hits, self.media_queries),
            "prompt_tokens": self.prompt_tokens,
            "cached_prompt_tokens": self.cached_prompt_tokens,
            "generation_tokens": self.generation_tokens,
            "prompt_tok_per_step_s": _rate(self.prompt_tokens, self.step_s, 1),
            "gen_tok_per_step_s": _rate(self.generation_tokens, self.step_s, 1),
            "prefill_step_share": _rate(self.prefill_step_s, self.step_s),
            "in_steps_share": _rate(self.step_s, engine_s),
        }


def _rate(part: float, whole: float, digits: int = 3) -> float | None:
    return round(part / whole, digits) if whole else None


def requests_held(kv_cache_tokens: int, tokens_per_request: float) -> int:
    """How many requests of ``tokens_per_request`` (prompt plus new tokens) the KV cache holds at once."""
    return int(kv_cache_tokens // max(tokens_per_request, 1))


def attach(llm_engine) -> EngineWork:
    """An ``EngineWork`` recording every step of ``llm_engine`` (vLLM's ``LLMEngine``, built with stats on),
    its KV cache size read from the engine's resolved config."""
    cache = llm_engine.vllm_config.cache_config
    work = EngineWork(kv_cache_tokens=(cache.num_gpu_blocks or 0) * cache.block_size)
    llm_engine.logger_manager.stat_loggers.append(work)
    return work


def work_line(work: dict) -> str:
    """``figures`` in one line of the printed summary (and the progress lines)."""
    parts = [
        f"KV cache {work['kv_cache_tokens']:,} tokens (peak {100 * work['kv_cache_usage_max']:.0f}% used)",
        f"running {work['running_mean']} mean / {work['running_max']} max",
        f"waiting {work['waiting_mean']} / {work['waiting_max']}",
        f"preempted {work['preemptions']}",
    ]
    for key, label in (("prefix_cache_hit_rate", "prefix hits"), ("media_cache_hit_rate", "media hits")):
        if work[key] is not None:
            parts.append(f"{label} {100 * work[key]:.0f}%")
    if work["prompt_tok_per_step_s"] is not None:
        parts.append(
            f"{work['prompt_tok_per_step_s']:,.0f} prompt + {work['gen_tok_per_step_s']:,.0f} generated tok/s "
            "in steps"
        )
    if work["in_steps_share"] is not None:
        parts.append(f"in steps {100 * work['in_steps_share']:.0f}% of the time")
    return ", ".join(parts)
