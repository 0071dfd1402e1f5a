"""What structured outputs cost: the project's vLLM engine (actors/engines/vllm/engine.py) on the tiny
checkpoint with its byte-level tokenizer, free text against a choice list, a regex and a JSON schema.
Writes bench/results/structured-<host>.json (``--out``: elsewhere).

    python -m bench.structured [--rows N] [--rounds R] [--backend vllm|transformers] [--full-size DIR]

Each structured run is paired with a free-text run of the same answer length (ignore_eos, max_tokens the
structured answers' mean), so the ratio is the grammar's cost per token, not a shorter answer's: the
mask computed per step (xgrammar, on the CPU beside the model) and applied to the logits. The first
request of each kind also compiles its grammar (``compile_ms``: one request alone, minus a free one's
time). Medians of interleaved rounds; the ratio is each round's (both halves under the same machine load),
its median and range. Runs on whatever device this machine has: on the CPU the tiny model,
whose steps are cheap, so the grammar's share is larger there than beside a real model; on a CUDA
device add ``--full-size DIR`` (the released architecture with random weights, written there unless
it is already; its tokenizer replaced by the byte-level one) and the engine runs as a GPU job runs it.
"""

from __future__ import annotations

import argparse
import statistics
import time

from bench.report import write_report
from bench.tiny import add_engine_arguments, device_name, engine_keys, engine_setup

PROMPT = "<|user|>Label this review: the mug keeps coffee hot for hours.<|end|><|assistant|>"
SPECS = {
    "choice": {"choice": ["positive", "negative", "neutral"]},
    "regex": {"regex": r"\d{4}-\d{2}-\d{2}"},
    "json": {
        "json_schema": {
            "type": "object",
            "properties": {
                "colour": {"enum": ["red", "green", "blue", "black", "white", "other"]},
                "for_children": {"type": "boolean"},
                "material": {"enum": ["wood", "metal", "plastic", "fabric", "paper", "other"]},
            },
            "required": ["colour", "for_children", "material"],
            "additionalProperties": False,
        }
    },
}


def engine_config(model: str, backend: str, cuda: bool):
    from schemas.job import JobConfig

    return JobConfig.model_validate({
        "input": {"path": "unused.parquet"}, "output": {"path": "unused"},
        "model": {"path": model, "load_format": "dummy" if backend == "vllm" else "auto"},
        "engine": engine_keys(backend, cuda, max_model_len=1024, max_num_seqs=256 if cuda else 64),
        "sampling": {"max_tokens": 96}, "repetition": {"enabled": False},  # free text runs its full length
    })  # fmt: skip


def timed(engine, requests) -> tuple[float, list]:
    started = time.perf_counter()
    results = engine.generate(requests)
    return time.perf_counter() - started, results


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=48, help="Requests per run (one generate call).")
    parser.add_argument("--rounds", type=int, default=5)
    add_engine_arguments(parser)
    args = parser.parse_args(argv)
    cuda, model, out = engine_setup("structured", args)

    from actors.engines import build_engine
    from actors.engines.contract import EngineRequest
    from actors.generate import run_init_hook
    from actors.output_check import problem
    from jobs.make_tiny_model import write_byte_tokenizer
    from schemas.annotation import StructuredSpec
    from schemas.sampling import RowSampling

    write_byte_tokenizer(model)
    config = engine_config(str(model), args.backend, cuda)
    run_init_hook(config.engine.init_hook)
    engine = build_engine(config)

    def requests(kind: str | None, n: int, max_tokens: int | None = None) -> list:
        spec = StructuredSpec(**SPECS[kind]) if kind else None
        sampling = RowSampling(max_tokens=max_tokens) if max_tokens else RowSampling()
        return [EngineRequest(prompt=PROMPT, structured=spec, sampling=sampling) for _ in range(n)]

    figures: dict = {"rows": args.rows}
    free_one, _ = timed(engine, requests(None, 1, 8))
    # the first structured request of an engine also builds xgrammar's view of the vocabulary
    setup_s, _ = timed(engine, [EngineRequest(prompt=PROMPT, structured=StructuredSpec(regex="a"))])
    figures["grammar_backend_setup_ms"] = round(max(setup_s - free_one, 0.0) * 1000, 1)
    for kind in SPECS:  # the first request of a kind compiles its grammar (cached for later ones)
        first_s, _ = timed(engine, requests(kind, 1))
        figures[f"{kind}.compile_ms"] = round(max(first_s - free_one, 0.0) * 1000, 1)
    runs: dict[str, list] = {}
    for _ in range(args.rounds):  # interleaved: each kind and its free pair see the same machine load
        for kind in SPECS:
            spec = StructuredSpec(**SPECS[kind])
            wall, results = timed(engine, requests(kind, args.rows))
            tokens = sum(r.completion_tokens for r in results)
            valid = sum(problem(r.text, spec) is None and r.finish_reason == "stop" for r in results)
            length = max(round(tokens / args.rows), 1)
            free_wall, free = timed(
                engine, [r.model_copy(update={"sampling": RowSampling(max_tokens=length)})
                         for r in requests(None, args.rows)]
            )  # fmt: skip
            free_tokens = sum(r.completion_tokens for r in free)
            runs.setdefault(kind, []).append((tokens / wall, free_tokens / free_wall, length, valid))
    for kind, samples in runs.items():  # ratios paired within a round: both halves saw the same load
        ratios = sorted(s[0] / s[1] for s in samples)
        figures[f"{kind}.tokens_per_answer"] = samples[-1][2]
        figures[f"{kind}.valid_answers"] = f"{min(s[3] for s in samples)}/{args.rows}"
        figures[f"{kind}.tokens_per_s"] = round(statistics.median(s[0] for s in samples), 1)
        figures[f"{kind}.free_text_same_length.tokens_per_s"] = round(
            statistics.median(s[1] for s in samples), 1
        )
        figures[f"{kind}.ratio"] = round(statistics.median(ratios), 3)
        figures[f"{kind}.ratio_range"] = f"{ratios[0]:.2f}-{ratios[-1]:.2f}"
    write_report("structured", figures, out, device=device_name(cuda), backend=args.backend, args=vars(args))


if __name__ == "__main__":
    main()
