"""GPU-stage engine driving: one LLM.generate call per batch (batches one after another) against the
continuous-batching loop shared by concurrent batches. Writes bench/results/engine-<host>.json.

    python -m bench.engine [--batches N] [--batch-size B] [--concurrent K]

Each batch mixes a few long generations with many short ones, as real batches do (captions of varying
length, short and long clips): with one call per batch the engine idles at the tail of every batch.
Runs vLLM on whatever device this machine has (CPU here), with the project's tiny checkpoint.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import threading
import time

from bench.report import write_report


def workload(batches: int, batch_size: int) -> list[list[tuple[str, int]]]:
    out = []
    for b in range(batches):
        batch = []
        for i in range(batch_size):
            long = i == 0  # one long generation per batch, the rest short
            batch.append(
                (f"<|user|>tell me about the world {b} {i}<|end|><|assistant|>", 192 if long else 16)
            )
        out.append(batch)
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--concurrent", type=int, default=4, help="Batches in flight in the loop mode.")
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

    from vllm import LLM, SamplingParams

    from actors.engines.vllm.loop import EngineLoop
    from jobs.make_tiny_model import write_tiny_checkpoint

    model = write_tiny_checkpoint(tempfile.mkdtemp(prefix="tiny-phi4mm-"))
    llm = LLM(model=str(model), trust_remote_code=True, load_format="dummy", dtype="float32", max_model_len=1024,
              enforce_eager=True, max_num_seqs=64, seed=0, distributed_executor_backend="uni")  # fmt: skip
    work = workload(args.batches, args.batch_size)
    rows = sum(map(len, work))

    def params(n):
        return SamplingParams(max_tokens=n, ignore_eos=True, temperature=0.0)

    llm.generate([work[0][0][0]], params(4), use_tqdm=False)  # warm-up
    started = time.perf_counter()
    for batch in work:
        llm.generate([p for p, _ in batch], [params(n) for _, n in batch], use_tqdm=False)
    per_batch_s = time.perf_counter() - started

    loop = EngineLoop(llm.llm_engine)
    pending = list(work)
    lock = threading.Lock()

    def worker():
        while True:
            with lock:
                if not pending:
                    return
                batch = pending.pop(0)
            futures = [loop.submit({"prompt": p}, params(n)) for p, n in batch]
            for f in futures:
                f.result()

    started = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(args.concurrent)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    loop_s = time.perf_counter() - started

    figures = {
        "rows": rows,
        "llm_generate_per_batch.rows_per_s": rows / per_batch_s,
        f"engine_loop_{args.concurrent}_batches.rows_per_s": rows / loop_s,
        "speedup": per_batch_s / loop_s,
        "engine_loop.max_in_flight": loop.stats.max_in_flight,
    }
    write_report("engine", figures, args.out, device="cpu", args=vars(args))


if __name__ == "__main__":
    main()
