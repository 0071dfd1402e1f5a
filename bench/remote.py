"""Media on an object store against media on local disk: rows/s of the CPU stage, written to
bench/results/remote-<host>.json.

    python -m bench.remote [--rows 128] [--batch-size 32] [--delays-ms 0,50,200] [--concurrency 32,1]
        [--rounds 5] [--work DIR] [--out PATH]

The CPU stage is ``actors.preprocess.PreprocessRows`` as one CPU actor runs it (one batch at a time, of
``resources.preprocess.batch_size``'s default size, its rows one after another), on distinct real media (``bench.dataset``: photos up to 4 MP, 3-20 s speech in
WAV/FLAC/OGG/MP3, image+audio rows; no text rows, which read no media), dynamic_hd 16. The same rows and
the same media files are read:

- ``local``: from local disk (``input.media_root`` a directory);
- ``s3.<delay>ms.c<N>``: from the project's S3 test server (tests/s3_server.py) in a process of its own,
  over loopback, with credentials from the AWS environment variables and the endpoint in
  ``storage.s3_endpoint``. ``<delay>``: the server's ``delay_s`` knob, added to every request (an item
  is a HEAD and a GET, so twice that per item): 0 is a store next door, 50 ms and 200 ms are slow or
  distant stores. ``c<N>``: ``media.remote_concurrency``, the items a CPU actor fetches at once ahead of
  its rows (``actors.media.fetch.RemoteFetcher.prefetch``; the default and the other values given);
  ``c1`` fetches one item at a time, still ahead of the rows, which is what no concurrent prefetch
  would give at best.

Figures per side, each the median over ``--rounds`` interleaved rounds (load that drifts on a shared host
hits every side alike): ``rows_per_s``; ``media_wait_ms_per_row``, how long the rows waited for their
media's bytes (a local read, or what is left of a fetch started ahead), which other processes' CPU load
barely moves; ``cpu_busy`` (process CPU seconds per wall second: about 1 when the stage is busy
preparing rows, lower when it waits for bytes or for a core); and ``over_local``, its rows/s over local
disk's in the same round. Every row must come out ok: error rows would be measuring something else.
docs/object-stores.md, "Object stores", has the figures.
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")  # one actor's figures
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from bench.report import write_report  # noqa: E402
from schemas.job import MediaConfig, ResourcesConfig  # noqa: E402

BUCKET = "bench"
MIX = "image=0.5,audio=0.3,image_audio=0.2"
DEFAULT_CONCURRENCY = MediaConfig.model_fields["remote_concurrency"].default
BATCH_SIZE = ResourcesConfig().preprocess.batch_size  # what a CPU actor is given per call by default


def sides(delays_ms: list[int], concurrency: list[int] = (DEFAULT_CONCURRENCY, 1)) -> list[tuple]:
    """``(name, delay_ms, concurrency)`` of every side: local disk first (``delay_ms`` None), then the
    store at each delay with each prefetch concurrency (the default one always among them)."""
    concurrency = sorted({DEFAULT_CONCURRENCY, *concurrency}, reverse=True)
    out: list[tuple] = [("local", None, None)]
    out += [(f"s3.{d}ms.c{c}", d, c) for d in delays_ms for c in concurrency]
    return out


def summarise(runs: dict[str, list[dict]]) -> dict:
    """Per side: the median of each figure over its rounds, and ``over_local``: the median over rounds of
    its rows/s over local disk's in the same round (a ratio within a round cancels the load that drifts
    between rounds)."""
    figures: dict = {}
    for name, rounds in runs.items():
        for key in rounds[0]:
            figures[f"{name}.{key}"] = round(statistics.median(r[key] for r in rounds), 3)
    local = runs.get("local")
    for name, rounds in runs.items():
        if name != "local" and local:
            ratios = [r["rows_per_s"] / base["rows_per_s"] for r, base in zip(rounds, local, strict=False)]
            figures[f"{name}.over_local"] = round(statistics.median(ratios), 3)
    return figures


def _serve(conn, media: str, prefix: str) -> None:
    """The S3 test server in this process, holding every file of ``media`` under ``prefix``; answers
    ``("delay", seconds)`` by setting its delay knob, ``("stop",)`` by stopping."""
    from tests.s3_server import S3Server

    with S3Server() as server:
        server.create_bucket(BUCKET)
        for path in sorted(Path(media).iterdir()):
            server.put(BUCKET, f"{prefix}/{path.name}", path.read_bytes())
        conn.send(server.endpoint)
        while (message := conn.recv())[0] != "stop":
            server.faults.delay_s = message[1]
            conn.send("ok")


def _config(data: Path, model: Path, media_root: str, endpoint: str | None, concurrency: int | None):
    from schemas.job import JobConfig

    media = {"remote_concurrency": concurrency} if concurrency else {}
    return JobConfig.model_validate({
        "input": {"path": str(data), "media_root": media_root},
        "output": {"path": str(data.parent / "out")},
        "model": {"path": str(model), "load_format": "dummy"},
        "engine": {"dtype": "float32", "max_model_len": 8192, "dynamic_hd": 16},
        "media": media,
        "storage": {"s3_endpoint": endpoint},
    })  # fmt: skip


@contextlib.contextmanager
def timed_reads(waits: list[float]):
    """Appends to ``waits`` the seconds each media item's read took as its row saw it (``read_media_path``
    as the CPU stage calls it: a local read, or the wait for a fetch that may have started ahead)."""
    import actors.media.decode

    read = actors.media.decode.read_media_path

    def timed(*args, **kwargs):
        started = time.perf_counter()
        try:
            return read(*args, **kwargs)
        finally:
            waits.append(time.perf_counter() - started)

    actors.media.decode.read_media_path = timed
    try:
        yield waits
    finally:
        actors.media.decode.read_media_path = read


def run_side(config, batches: list[pa.Table]) -> dict:
    """One pass of a fresh CPU stage over ``batches``: rows/s, CPU seconds per wall second, and the
    milliseconds per row its rows waited for their media's bytes."""
    from actors.preprocess import PreprocessRows

    stage = PreprocessRows(config)
    stage(batches[0].slice(0, 1))  # the tokenizer's first call and the first connection, not timed
    rows, errors = 0, []
    with timed_reads([]) as waits:
        wall, cpu = time.perf_counter(), time.process_time()
        for batch in batches:
            out = stage(batch)
            rows += out.num_rows
            errors += [m for m in out.column("error_message").to_pylist() if m]
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    if errors:
        raise RuntimeError(f"{len(errors)} error rows, e.g. {errors[0]}")
    return {
        "rows_per_s": rows / wall,
        "cpu_busy": cpu / wall,
        "media_wait_ms_per_row": sum(waits) * 1000 / rows,
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=BATCH_SIZE, help="rows per call of the stage")
    parser.add_argument("--delays-ms", default="0,50,200", help="the store's added latency per request")
    parser.add_argument(
        "--concurrency", default="32,1", help="media.remote_concurrency values besides the default"
    )
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--work", help="scratch directory (dataset, checkpoint); kept")
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    from bench.dataset import build_dataset
    from jobs.make_tiny_model import write_tiny_checkpoint
    from tests.s3_server import ACCESS_KEY, SECRET_KEY

    work = Path(args.work or tempfile.mkdtemp(prefix="bench-remote-"))
    data, model = work / f"data-{args.rows}", work / "model"
    if not data.exists():
        build_dataset(data, rows=args.rows, mix=MIX, media="path", max_megapixels=4, audio_seconds=(3, 20))
    if not (model / "config.json").exists():
        write_tiny_checkpoint(model, dynamic_hd=16)
    table = pa.concat_tables(pq.read_table(p) for p in sorted(data.glob("part-*.parquet")))
    batches = [table.slice(i, args.batch_size) for i in range(0, table.num_rows, args.batch_size)]
    # the bench's own server: its credentials, as a user sets them (the AWS SDK's environment chain)
    os.environ.update(AWS_ACCESS_KEY_ID=ACCESS_KEY, AWS_SECRET_ACCESS_KEY=SECRET_KEY, AWS_REGION="us-east-1")
    conn, child = multiprocessing.get_context("spawn").Pipe()
    server = multiprocessing.get_context("spawn").Process(target=_serve, args=(child, str(data / "media"),
                                                                               "data/media"), daemon=True)  # fmt: skip
    server.start()
    try:
        endpoint = conn.recv()
        runs: dict[str, list[dict]] = {}
        delays, widths = ([int(v) for v in a.split(",")] for a in (args.delays_ms, args.concurrency))
        load = os.getloadavg()  # the machine may be shared: what else ran is in the JSON
        for n in range(args.rounds):
            for name, delay_ms, concurrency in sides(delays, widths):
                if delay_ms is None:
                    config = _config(data, model, str(data), None, None)
                else:
                    conn.send(("delay", delay_ms / 1000))
                    conn.recv()
                    config = _config(data, model, f"s3://{BUCKET}/data", endpoint, concurrency)
                runs.setdefault(name, []).append(run_side(config, batches))
                print(f"round {n + 1}: {name} {runs[name][-1]['rows_per_s']:.1f} rows/s", flush=True)
    finally:
        conn.send(("stop",))
        server.join(timeout=30)
    write_report("remote", summarise(runs), args.out, rows=table.num_rows, batch_size=args.batch_size,
                 rounds=args.rounds, dynamic_hd=16, mix=MIX, load_before=load, load_after=os.getloadavg())  # fmt: skip


if __name__ == "__main__":
    main()
