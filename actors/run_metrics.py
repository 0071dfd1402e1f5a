"""A run's rows, errors, tokens and engine state as Ray metrics, where clusters look for them.

Ray exports an application's metrics on every node's metrics port (Prometheus text; the dashboard's
Metrics view and Grafana read the same), each name prefixed ``ray_`` and tagged with ``run_id``:

| metric | kind | tags |
| --- | --- | --- |
| ``ray_phi4mm_rows_total`` | counter | ``status`` (ok, error), ``error_code`` (empty when ok) |
| ``ray_phi4mm_tokens_total`` | counter | ``kind`` (prompt, completion) |
| ``ray_phi4mm_engine_kv_cache_tokens`` | gauge | ``actor`` |
| ``ray_phi4mm_engine_kv_cache_usage_peak`` | gauge | ``actor`` (0-1) |
| ``ray_phi4mm_engine_waiting_peak`` | gauge | ``actor`` (requests waiting for the engine, most at once) |
| ``ray_phi4mm_engine_preemptions`` | gauge | ``actor`` (so far) |

The GPU actors record them as they answer rows (``actors.generate``), beside the ledger's counts that the
progress lines read. Ray is imported when the first metric is made, in the actor's process.
"""

from __future__ import annotations

from schemas.rows import Status

ENGINE_GAUGES = {  # gauge name -> the engine work figure it shows (actors.engines.vllm.stats)
    "phi4mm_engine_kv_cache_tokens": ("kv_cache_tokens", "KV cache size of the engine, in tokens"),
    "phi4mm_engine_kv_cache_usage_peak": ("kv_cache_usage_max", "Highest share of the KV cache in use"),
    "phi4mm_engine_waiting_peak": ("waiting_max", "Most requests waiting for the engine at once"),
    "phi4mm_engine_preemptions": ("preemptions", "Requests preempted and computed again, so far"),
}


class RunMetrics:
    def __init__(self, run_id: str, actor: str):
        from ray.util.metrics import Counter, Gauge

        self.run_id, self.actor = run_id, actor
        self.rows = Counter("phi4mm_rows", "Rows answered, by status and error code",
                            tag_keys=("run_id", "status", "error_code"))  # fmt: skip
        self.tokens = Counter("phi4mm_tokens", "Prompt and completion tokens", tag_keys=("run_id", "kind"))
        self.gauges = {
            name: Gauge(name, description, tag_keys=("run_id", "actor"))
            for name, (_, description) in ENGINE_GAUGES.items()
        }

    def record_rows(self, rows: list[dict]) -> None:
        counts: dict[tuple[str, str], int] = {}
        for r in rows:
            key = (r["status"], "" if r["status"] == Status.OK.value else r["error_code"] or "")
            counts[key] = counts.get(key, 0) + 1
        for (status, code), n in counts.items():
            self.rows.inc(n, tags={"run_id": self.run_id, "status": status, "error_code": code})
        for kind in ("prompt", "completion"):
            n = sum(r[f"{kind}_tokens"] or 0 for r in rows)
            if n:
                self.tokens.inc(n, tags={"run_id": self.run_id, "kind": kind})

    def record_engine(self, stats: dict) -> None:
        work = stats.get("work")
        if not work:  # an engine without vLLM's figures (transformers)
            return
        tags = {"run_id": self.run_id, "actor": self.actor}
        for name, (figure, _) in ENGINE_GAUGES.items():
            self.gauges[name].set(work[figure], tags=tags)
