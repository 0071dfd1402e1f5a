"""What several tasks per row save: the project's CPU and GPU stages (``PreprocessRows``, ``GenerateRows``)
in this process on the tiny checkpoint, audio rows asked to transcribe, translate and summarize, as one
job with ``tasks`` against the same three presets as three ``task`` jobs. Writes
bench/results/multitask-<host>.json (``--out``: elsewhere).

    python -m bench.multitask [--rows N] [--rounds R] [--backend vllm|transformers] [--full-size DIR]

Every answer is ``--max-tokens`` long (ignore_eos), so both ways generate the same tokens; the difference
is the media decoded and prepared once instead of once per task, and whatever the engine's caches share
between a row's requests. Every row's clip is distinct (the two sample clips at a gain of its own), and
the engine's prefix and media caches are emptied before each run: separate jobs over many rows find
nothing of another task's run there, so the separate runs must not either. One engine serves every run;
medians of interleaved rounds. Runs on whatever device this machine has: on the CPU the tiny model, whose
steps are cheap, so the preprocessing share is larger there than beside a real model; on a CUDA device add
``--full-size DIR`` (the released architecture with random weights and adapters, written there unless it
is already) and the engine runs as a GPU job runs it.
"""

from __future__ import annotations

import argparse
import statistics
import time

from bench.report import write_report
from bench.tiny import add_engine_arguments, device_name, engine_keys, engine_setup

TASKS = {
    "transcript": {"preset": "transcribe"},
    "french": {"preset": "translate", "target_language": "French"},
    "summary": {"preset": "summarize_audio"},
}


def job(model: str, backend: str, cuda: bool, max_tokens: int, **section):
    from schemas.job import JobConfig

    return JobConfig.model_validate({
        "input": {"path": "unused.parquet", "columns": {"audio": "audio"}}, "output": {"path": "unused"},
        "model": {"path": model, "load_format": "dummy" if backend == "vllm" else "auto"},
        "engine": engine_keys(backend, cuda, max_model_len=2048, max_num_seqs=256 if cuda else 64),
        "sampling": {"max_tokens": max_tokens, "ignore_eos": True}, "repetition": {"enabled": False},
        **section,
    })  # fmt: skip


def rows(n: int):
    """``n`` rows of distinct clips: the sample clips alternately, each row at its own gain (as WAV)."""
    import io

    import pyarrow as pa
    import soundfile as sf

    from schemas.rows import MEDIA_STRUCT
    from tests.helpers import MEDIA

    clips = [sf.read(MEDIA / name, dtype="float32") for name in ("fox.wav", "morning.mp3")]
    table = []
    for i in range(n):
        samples, rate = clips[i % 2]
        buffer = io.BytesIO()
        sf.write(buffer, samples * (0.9 - 0.4 * i / max(n, 1)), rate, format="WAV", subtype="FLOAT")
        table.append({"id": f"r{i}", "audio": {"bytes": buffer.getvalue(), "path": f"r{i}.wav"}})
    return pa.Table.from_pylist(table, schema=pa.schema([("id", pa.string()), ("audio", MEDIA_STRUCT)]))


def empty_caches(engine) -> None:
    """Empty the vLLM engine's prefix cache and its processed-media cache (transformers keeps none)."""
    llm = getattr(engine, "llm", None)
    if llm is not None:
        llm.reset_prefix_cache()
        llm.reset_mm_cache()


def stages(configs, engine) -> list:
    """Each config's two stages, built before any timing (a tokenizer load is not the work compared)."""
    from actors.generate import GenerateRows
    from actors.preprocess import PreprocessRows

    return [
        (PreprocessRows(c), GenerateRows(c, run_id="bench", engine_factory=lambda _: engine)) for c in configs
    ]


def ok_answers(out) -> int:
    """Answers that came back ok: each task struct's status with tasks, the row's without."""
    from schemas.multitask import TASK_PREFIX

    columns = [n for n in out.column_names if n.startswith(TASK_PREFIX)]
    if not columns:
        return out.column("status").to_pylist().count("ok")
    return sum(t["status"] == "ok" for n in columns for t in out.column(n).to_pylist())


def run(built, table) -> dict:
    """The stages over ``table`` once per config: seconds in each stage, tokens generated, ok answers."""
    figures = {"preprocess_s": 0.0, "generate_s": 0.0, "completion_tokens": 0, "ok": 0}
    for preprocess, generate in built:
        empty_caches(generate.engine)
        started = time.perf_counter()
        prepared = preprocess(table)
        middle = time.perf_counter()
        out = generate(prepared)
        figures["preprocess_s"] += middle - started
        figures["generate_s"] += time.perf_counter() - middle
        figures["completion_tokens"] += sum(out.column("completion_tokens").to_pylist())
        figures["ok"] += ok_answers(out)
    return figures


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=24, help="Audio rows per run.")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=32, help="Every answer's length.")
    add_engine_arguments(parser)
    args = parser.parse_args(argv)
    cuda, model, out = engine_setup("multitask", args)

    from actors.engines import build_engine
    from actors.generate import run_init_hook

    together = [job(str(model), args.backend, cuda, args.max_tokens, tasks=TASKS)]
    apart = [job(str(model), args.backend, cuda, args.max_tokens, task=t) for t in TASKS.values()]
    run_init_hook(together[0].engine.init_hook)
    engine = build_engine(together[0])
    table = rows(args.rows)
    built = {"tasks": stages(together, engine), "separate": stages(apart, engine)}
    for way in built.values():
        run(way, rows(2))  # warm: the first requests of each prompt
    samples: dict[str, list[dict]] = {"tasks": [], "separate": []}
    for _ in range(args.rounds):  # interleaved: both ways see the same machine load
        for way, parts in built.items():
            samples[way].append(run(parts, table))
    figures: dict = {"rows": args.rows, "tasks": len(TASKS), "answer_tokens": args.max_tokens}
    for way, runs in samples.items():
        for key in ("preprocess_s", "generate_s"):
            figures[f"{way}.{key}"] = round(statistics.median(r[key] for r in runs), 3)
        walls = [r["preprocess_s"] + r["generate_s"] for r in runs]
        figures[f"{way}.wall_s"] = round(statistics.median(walls), 3)
        figures[f"{way}.tokens_per_s"] = round(
            statistics.median(r["completion_tokens"] / w for r, w in zip(runs, walls, strict=True)), 1
        )
        figures[f"{way}.ok_answers"] = f"{min(r['ok'] for r in runs)}/{args.rows * len(TASKS)}"
    figures["speedup_wall"] = round(figures["separate.wall_s"] / figures["tasks.wall_s"], 2)
    figures["preprocess_saved"] = round(
        1 - figures["tasks.preprocess_s"] / figures["separate.preprocess_s"], 2
    )
    write_report("multitask", figures, out, device=device_name(cuda), backend=args.backend, args=vars(args))


if __name__ == "__main__":
    main()
