"""The engine's useful-work figures (actors.engines.vllm.stats) from vLLM's own per-step stats objects."""

from vllm.v1.metrics.stats import (
    IterationStats,
    MultiModalCacheStats,
    PrefillStats,
    PrefixCacheStats,
    SchedulerStats,
)

from actors.engines.vllm.stats import EngineWork, requests_held, work_line


def _step(work: EngineWork, running, waiting, prompt=0, generated=0, preempted=0, hits=(0, 0), media=(0, 0)):
    sched = SchedulerStats(num_running_reqs=running, num_waiting_reqs=waiting, kv_cache_usage=running / 100)
    sched.prefix_cache_stats = PrefixCacheStats(queries=hits[0], hits=hits[1])
    it = IterationStats()
    if prompt:
        it.prompt_token_stats.update_from_output(
            PrefillStats(
                num_prompt_tokens=prompt, num_computed_tokens=prompt - hits[1], num_cached_tokens=hits[1]
            )
        )
    it.num_generation_tokens = generated
    it.num_preempted_reqs = preempted
    mm = MultiModalCacheStats(queries=media[0], hits=media[1])
    work.record(sched, it, mm_cache_stats=mm)


def test_steps_add_up_to_the_engines_figures():
    work = EngineWork(kv_cache_tokens=4096)
    _step(work, running=2, waiting=6, prompt=100, generated=2, hits=(100, 40), media=(2, 1))
    work.step_timed(0.5)
    _step(work, running=4, waiting=2, generated=4, preempted=1)
    work.step_timed(0.25)
    f = work.figures(engine_s=1.0)
    assert f["steps"] == 2 and f["running_mean"] == 3.0 and f["running_max"] == 4
    assert f["waiting_mean"] == 4.0 and f["waiting_max"] == 6 and f["preemptions"] == 1
    assert f["prompt_tokens"] == 100 and f["cached_prompt_tokens"] == 40 and f["generation_tokens"] == 6
    assert f["prefix_cache_hit_rate"] == 0.4 and f["media_cache_hit_rate"] == 0.5
    assert f["kv_cache_usage_max"] == 0.04
    assert f["prompt_tok_per_step_s"] == round(100 / 0.75, 1) and f["gen_tok_per_step_s"] == 8.0
    assert f["prefill_step_share"] == round(0.5 / 0.75, 3)  # only the first step finished a prefill
    assert f["in_steps_share"] == 0.75
    assert "KV cache 4,096 tokens" in work_line(f) and "preempted 1" in work_line(f)


def test_reset_keeps_the_cache_size_and_nothing_else():
    work = EngineWork(kv_cache_tokens=4096)
    _step(work, running=1, waiting=0, prompt=10, generated=1)
    work.step_timed(0.1)
    work.reset()
    assert work == EngineWork(kv_cache_tokens=4096)
    assert work.figures(0.0)["in_steps_share"] is None  # no time yet: no share, not a division by zero


def test_requests_held_at_a_rows_size():
    assert requests_held(439_876, 1_900 + 128) == 216
    assert requests_held(24_671, 2_028) == 12  # the 80 GB card's second engine in the run
