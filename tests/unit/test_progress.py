"""Progress lines, the rate plot and the manifest's provenance, driven without Ray: a stand-in clock and
counts, the GPU stage with a stand-in engine, the tiny checkpoint's files."""

import io
import json
import logging
import shutil

import pyarrow as pa
import pytest
from PIL import Image

from actors.attempts import LocalAttemptLedger
from actors.generate import GenerateRows
from pipelines.progress import ProgressMonitor, Sample
from pipelines.progress_plot import MARK_COLOUR, PANEL_HEIGHT, WIDTH, progress_png, rates
from pipelines.provenance import checkpoint_hashes, config_hash, file_hash, provenance, versions
from schemas.rows import PREPARED_SCHEMA, empty_prepared_row
from tests.helpers import make_config
from tests.unit.test_generate import EchoEngine


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def _counts(rows, errors=None, tokens=10):
    return {"rows": rows, "ok": rows - sum((errors or {}).values()), "error_codes": errors or {},
            "prompt_tokens": rows * tokens, "completion_tokens": rows}  # fmt: skip


def test_lines_say_rows_of_total_rate_eta_and_errors(caplog):
    clock, actors = Clock(), {}
    monitor = ProgressMonitor(lambda: dict(actors), total=400, every_s=30, clock=clock)
    caplog.set_level(logging.INFO, "phi4mm_batch.progress")
    for t, a, b in ((10, 20, 0), (20, 40, 20), (30, 60, 60)):  # two actors, 6 rows/s together by t=30
        clock.now = 100 + t
        actors.update(
            a=_counts(a, {"MEDIA_NOT_FOUND": 2}), b=_counts(b, {"IMAGE_DECODE_ERROR": 1}) if b else {}
        )
        monitor.tick()
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [
        "progress: 120/400 rows (30%), 4.00 rows/s, ETA 1m10s, errors 3 (MEDIA_NOT_FOUND 2, IMAGE_DECODE_ERROR 1)"
    ]  # one line per every_s; the rate over the last minute: 120 rows in 30 s
    clock.now += 15
    assert monitor.sample().rows == 120  # nothing new: the rate falls, the ETA grows
    assert "ETA 1m45s" in monitor.line(monitor.samples[-1])


def test_a_failed_read_keeps_the_last_counts_and_no_log_when_interactive(caplog):
    clock = Clock()
    reads = iter([{"a": _counts(5)}, RuntimeError("ledger restarting"), {"a": _counts(9)}])

    def poll():
        value = next(reads)
        if isinstance(value, Exception):
            raise value
        return value

    monitor = ProgressMonitor(poll, total=10, every_s=1, log=False, clock=clock)
    caplog.set_level(logging.INFO, "phi4mm_batch.progress")
    for _ in range(3):
        clock.now += 2
        monitor.tick()
    assert [s.rows for s in monitor.samples] == [0, 5, 9] and not caplog.records
    assert "ETA unknown" in ProgressMonitor(lambda: {}, total=10).line(Sample(0.0, 0, 0))


def test_the_monitor_thread_samples_until_stopped_and_keeps_the_final_counts():
    counts = {"a": _counts(3)}
    monitor = ProgressMonitor(lambda: counts, total=3, every_s=1, log=False).start()
    counts = {"a": _counts(3)} | {"b": _counts(4)}
    monitor.stop()
    monitor.stop()  # again: nothing
    assert monitor.samples[-1].rows == 7 and monitor._thread.is_alive() is False


def test_rates_are_per_interval_and_the_png_draws_both_panels():
    samples = [Sample(float(t), rows=3 * t, tokens=300 * t) for t in range(0, 601, 2)]
    points = rates(samples, "rows")
    assert len(points) == 30 and all(r == pytest.approx(3.0) for _, r in points)  # 20 s intervals
    assert rates(samples[:1], "rows") == []
    image = Image.open(io.BytesIO(progress_png(samples, "run x")))
    assert image.size == (WIDTH, 2 * PANEL_HEIGHT + 30) and image.format == "PNG"
    pixels = image.convert("RGB")
    top = {pixels.getpixel((x, y)) for x in range(80, WIDTH - 30) for y in range(40, PANEL_HEIGHT)}
    bottom = {
        pixels.getpixel((x, y))
        for x in range(80, WIDTH - 30)
        for y in range(PANEL_HEIGHT + 40, 2 * PANEL_HEIGHT)
    }
    assert (31, 119, 180) in top and (214, 39, 40) in bottom  # each panel's rate line
    progress_png([Sample(0.0, 0, 0)], "a run that answered nothing")  # no points: still a picture
    marked = Image.open(io.BytesIO(progress_png(samples, "run x", marks=[(300.0, "engine up")]))).convert(
        "RGB"
    )
    column = {marked.getpixel((80 + (WIDTH - 30 - 80) // 2, y)) for y in range(60, PANEL_HEIGHT - 40)}
    assert MARK_COLOUR in column and MARK_COLOUR not in top  # a dashed line half way: the engine came up


def test_rates_are_smoothed_over_batches_landing():
    # 32 rows land every 8 s (a batch at a time), sampled every 2 s: 4 rows/s, not 0 and 16 in turn
    samples = [Sample(float(t), rows=32 * (t // 8), tokens=0) for t in range(0, 401, 2)]
    values = [r for _, r in rates(samples, "rows")]
    assert len(values) == 20 and all(3.0 <= r <= 5.0 for r in values)


def test_the_gpu_stage_reports_its_rows_and_device(tiny_model, tmp_path):
    ledger = LocalAttemptLedger()
    stage = GenerateRows(
        make_config(tiny_model, tmp_path), run_id="r", engine_factory=EchoEngine, ledger=ledger
    )
    rows = [empty_prepared_row("a") | {"prompt": "hi"}, empty_prepared_row("b") | {"prompt": "FAIL"},
            empty_prepared_row("c") | {"status": "error", "error_code": "MISSING_INPUT"}]  # fmt: skip
    stage(pa.Table.from_pylist(rows, schema=PREPARED_SCHEMA))
    stage(pa.Table.from_pylist(rows[:1], schema=PREPARED_SCHEMA))
    stats = ledger.actor_stats()
    (progress,) = stats["progress"].values()
    assert progress == {"rows": 4, "ok": 2, "error_codes": {"ENGINE_ERROR": 1, "MISSING_INPUT": 1},
                        "prompt_tokens": 14, "completion_tokens": 6}  # fmt: skip
    (device,) = stats["device"].values()
    assert device["device"] == "cpu" and device["host"]


def test_provenance_hashes_the_config_and_checkpoint_and_names_versions(tiny_model, tmp_path):
    config = make_config(tiny_model, tmp_path)
    assert config_hash(config) == config_hash(make_config(tiny_model, tmp_path))
    assert config_hash(config) != config_hash(make_config(tiny_model, tmp_path, sampling={"max_tokens": 9}))
    found = versions()
    assert (
        found["phi4mm-batch"] and found["vllm"] and found["ray"] and found["torch"] and found["transformers"]
    )
    copy = shutil.copytree(tiny_model, tmp_path / "copy")
    before = checkpoint_hashes(str(copy))
    assert before["config_sha256"] == file_hash(copy / "config.json")
    assert all(len(h) == 64 for h in before["adapters_sha256"].values())
    (copy / "speech-lora" / "adapter_config.json").write_text(json.dumps({"r": 1}))
    after = checkpoint_hashes(str(copy))
    assert after["adapters_sha256"]["speech"] != before["adapters_sha256"]["speech"]
    assert after["adapters_sha256"]["vision"] == before["adapters_sha256"]["vision"]
    assert checkpoint_hashes("s3://bucket/model")["config_sha256"] is None
    signed = checkpoint_hashes("https://user:PASSWORD@host/model?X-Amz-Signature=SECRET")["path"]
    assert signed == "https://***@host/model?X-Amz-Signature=***"  # the manifest shows no secret
    record = provenance(config, {"h:1": {"host": "gpu-node-1", "device": "NVIDIA H200"}})
    assert record["devices"] == ["NVIDIA H200"] and record["hosts"] == ["gpu-node-1"]
    assert record["checkpoint"]["path"] == tiny_model and json.dumps(record)
    from actors.engines.adapters import resolve_adapters
    from pipelines.provenance import tree_hash

    dirs = resolve_adapters(config.model)  # the checkpoint's own: their hash is the checkpoint's, reused
    in_use = provenance(config, None, dirs)["adapters"]
    assert in_use["speech"] == {"source": f"{tiny_model}/speech-lora", "custom": False,
                                "sha256": tree_hash(dirs["speech"])}  # fmt: skip
    assert in_use["vision"]["sha256"] == record["checkpoint"]["adapters_sha256"]["vision"]


def test_lines_say_engines_are_starting_then_add_their_useful_work(caplog):
    from actors.engines.vllm.stats import EngineWork

    clock, engines = Clock(), {}
    monitor = ProgressMonitor(lambda: {"a": _counts(0)}, total=40, every_s=10, clock=clock,
                              engines=lambda: dict(engines), wall=lambda: 1000.0 + clock.now)  # fmt: skip
    caplog.set_level(logging.INFO, "phi4mm_batch.progress")
    clock.now += 10
    monitor.tick()  # no GPU actor has reported yet: the line as before
    engines["x"] = {"starting_since": 1000.0 + clock.now}  # a GPU actor began building its engine
    clock.now += 35
    monitor.tick()
    busy, starved = EngineWork(kv_cache_tokens=100), EngineWork(kv_cache_tokens=100)
    busy.kv_usage_max, busy.waiting_max, busy.preemptions = 0.9, 40, 3
    starved.kv_usage_max, starved.preemptions = 0.2, 1
    engines.update(x={"work": busy.figures(1.0)}, y={"work": starved.figures(1.0)}, z={"busy_s": 1.0})
    clock.now += 10
    monitor.tick()
    first, starting, up = (r.getMessage() for r in caplog.records)
    assert "engines" not in first
    assert starting.endswith("ETA unknown, errors 0; engines: 1 starting for 0m35s")
    # z: an engine without vLLM's figures (transformers) is up all the same
    assert up.endswith("; engines: 3 up, KV peak 90%, waiting max 40, preempted 4")


def test_stopping_logs_the_final_counts(caplog):
    clock, counts = Clock(), {"a": _counts(0)}
    monitor = ProgressMonitor(lambda: dict(counts), total=40, every_s=60, clock=clock)
    caplog.set_level(logging.INFO, "phi4mm_batch.progress")
    clock.now += 30
    counts["a"] = _counts(40, {"MEDIA_NOT_FOUND": 1})
    monitor.stop()  # no periodic line fell due: the last counts are logged all the same
    (line,) = (r.getMessage() for r in caplog.records)
    assert line == "progress: done, 40/40 rows in 0m30s, 1.33 rows/s on average, errors 1"
