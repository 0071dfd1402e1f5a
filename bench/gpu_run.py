"""One side of ``bench/gpu.py``, run in a process of its own so that each starts cold and its engine start,
memory and CPU use are its own.

    python -m bench.gpu_run MODE CONFIG.yaml RESULT.json      MODE: pipeline | plain | engine

- ``pipeline``: ``python -m jobs.run`` on the config (local Ray, CPU pool, GPU actor, Parquet out);
- ``plain``: ``bench.plain_vllm``, the script a user writes;
- ``engine``: the engine alone, ``LLM.generate`` over every row prepared beforehand by the CPU stage
  (not timed): the ceiling for what any driver around this engine can reach. With ``--lora-cost K``, K
  rows with media are held out of that pass and then run with their adapters and again without, in the
  same engine; the second run's media get new cache keys, so neither run reuses the other's encoder
  outputs or (adapters being part of the key) cached prefixes.

Writes RESULT.json: wall-clock marks (``start``, ``engine_up``, ``done``) and the row and token counts.
"""

from __future__ import annotations

import time

START = time.time()  # before the heavy imports: they are part of every side's start-up

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402

from schemas.job import JobConfig  # noqa: E402


def run_pipeline(config_path: str, marks: dict) -> dict:
    from jobs.run import main

    run_id = f"bench-{int(START)}"
    status = main(["--config", config_path, "--run-id", run_id])
    config = JobConfig.from_yaml(config_path)
    with open(os.path.join(config.output.path, f"_run-{run_id}.json")) as f:
        summary = json.load(f)
    engines = summary["engines"].values()
    marks["engine_up"] = min(e["ready_at"] for e in engines)
    return {
        "rows": summary["rows_written"],
        "ok_rows": summary["status"].get("ok", 0),
        "error_rows": summary["status"].get("error", 0),
        "prompt_tokens": summary["prompt_tokens"],
        "completion_tokens": summary["completion_tokens"],
        "engine_start_s": max(e["startup_s"] for e in engines),
        "engine_busy_s": sum(e["busy_s"] for e in engines),
        "engine_max_in_flight": max(e["max_in_flight"] for e in engines),
        "cpu_actor_rows": sorted(s["rows"] for s in summary.get("cpu_actors", {}).values()),
        "audit_ok": summary["audit"]["ok"] and status == 0,
    }


def prepare_all(config: JobConfig):
    """Every input row through the CPU stage, on all cores: the engine side's inputs, made beforehand."""
    import pyarrow as pa
    import pyarrow.dataset as pads

    from pipelines.cpu_pool import prepare_in_processes, usable_cores

    table = pads.dataset(config.input.path, format="parquet").to_table()
    batches = (table.slice(i, 16) for i in range(0, table.num_rows, 16))
    return pa.concat_tables(prepare_in_processes(config, batches, usable_cores()))


def _with_fresh_keys(prompt: dict, suffix: str) -> dict:
    if suffix and "multi_modal_uuids" in prompt:
        prompt["multi_modal_uuids"] = {
            k: [u + suffix for u in v] for k, v in prompt["multi_modal_uuids"].items()
        }
    return prompt


def run_engine(config: JobConfig, marks: dict, lora_cost_rows: int) -> dict:
    from actors.engines.contract import EngineRequest
    from actors.engines.vllm.engine import engine_kwargs, engine_prompt
    from actors.engines.vllm.plugin import register
    from actors.generate import prepared_rows, run_init_hook
    from bench.plain_vllm import lora_requests, sampling_params

    prepared = prepared_rows(prepare_all(config))
    requests = [r for row in prepared if row["status"] == "ok" for r in EngineRequest.from_prepared(row)]
    held = set([i for i, r in enumerate(requests) if r.adapter][:lora_cost_rows])
    lora_rows = [r for i, r in enumerate(requests) if i in held]
    requests = [r for i, r in enumerate(requests) if i not in held]
    marks["prepared"] = time.time()
    run_init_hook(config.engine.init_hook)
    register()
    from vllm import LLM

    started = time.time()
    llm = LLM(**engine_kwargs(config))
    marks["engine_up"] = time.time()
    loras = lora_requests(config)
    prompts = [engine_prompt(r) for r in requests]
    params = sampling_params(config)
    outputs = llm.generate(
        prompts, params, lora_request=[loras.get(r.adapter) for r in requests], use_tqdm=False
    )
    marks["generated"] = time.time()
    result = {
        "rows": len(prepared),
        "ok_rows": len(outputs),
        "prompt_tokens": sum(len(o.prompt_token_ids) for o in outputs),
        "completion_tokens": sum(len(o.outputs[0].token_ids) for o in outputs),
        "engine_start_s": round(marks["engine_up"] - started, 2),
        "prepare_s": round(marks["prepared"] - START, 2),
    }
    if lora_rows:  # the held-out rows with their adapters, then without (fresh media keys), in this engine
        runs = (
            ("with_adapters", [loras.get(r.adapter) for r in lora_rows], ""),
            ("no_adapters", None, "-again"),
        )
        for label, adapters, key in runs:
            prompts = [_with_fresh_keys(engine_prompt(r), key) for r in lora_rows]
            t = time.perf_counter()
            out = llm.generate(prompts, params, lora_request=adapters, use_tqdm=False)
            result[f"lora_cost.{label}.rows_per_s"] = round(len(out) / (time.perf_counter() - t), 3)
        result["lora_cost.rows"] = len(lora_rows)
    return result


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=["pipeline", "plain", "engine"])
    parser.add_argument("config")
    parser.add_argument("result")
    parser.add_argument(
        "--lora-cost", type=int, default=0, help="engine mode: rows run with and without adapters"
    )
    parser.add_argument(
        "--chunk-rows", type=int, default=0, help="plain mode: decode and generate this many rows at a time"
    )
    args = parser.parse_args(argv)
    marks = {"start": START}
    config = JobConfig.from_yaml(args.config)
    if args.mode == "pipeline":
        result = run_pipeline(args.config, marks)
    elif args.mode == "plain":
        from bench.plain_vllm import run

        result = run(config, marks, args.chunk_rows)
    else:
        result = run_engine(config, marks, args.lora_cost)
    marks["done"] = time.time()
    with open(args.result, "w") as f:
        json.dump({"mode": args.mode, "marks": marks, **result}, f, indent=1)


if __name__ == "__main__":
    main()
