"""The GPU stage with a stand-in engine: row bookkeeping only. The real engine is exercised in
tests/integration (vLLM on the CPU)."""

import numpy as np
import pyarrow as pa
import pytest

from actors.engines.adapters import lora_rank_of, resolve_adapters
from actors.engines.contract import EngineResult
from actors.engines.vllm.engine import engine_kwargs
from actors.generate import GenerateRows
from schemas.rows import OUTPUT_SCHEMA, PREPARED_SCHEMA, empty_prepared_row
from tests.helpers import make_config


class EchoEngine:
    """Answers with the prompt length; fails any request whose prompt contains 'FAIL'."""

    def __init__(self, config):
        self.calls = []

    def stats(self):
        return {"requests": sum(map(len, self.calls))}

    def generate(self, requests):
        self.calls.append(requests)
        return [
            EngineResult(error="ValueError: rejected") if "FAIL" in r.prompt
            else EngineResult(text=f"len={len(r.prompt)}", prompt_tokens=7, completion_tokens=3, finish_reason="length")
            for r in requests
        ]  # fmt: skip


def _audio(frames: int, value: float = 0.0) -> dict:
    """A prepared audio entry (log-mel features) as the CPU stage writes it."""
    features = np.full((frames, 80), value, "<f4")
    return {
        "features": features.tobytes(),
        "frames": frames,
        "uuid": f"a{value}-{frames}",
        "with_images": False,
    }


def _prepared(row_id, prompt, status="ok", **extra):
    row = empty_prepared_row(row_id) | {"prompt": prompt, "status": status} | extra
    return row


def test_error_rows_pass_through_and_engine_errors_are_isolated(tiny_model, tmp_path):
    cfg = make_config(tiny_model, tmp_path)
    stage = GenerateRows(cfg, run_id="r1", engine_factory=EchoEngine)
    audio = _audio(98)
    rows = [
        _prepared("a", "<|user|>hi<|end|><|assistant|>"),
        _prepared("b", None, status="error", error_code="IMAGE_DECODE_ERROR", error_message="bad"),
        _prepared("c", "<|user|>FAIL<|end|><|assistant|>"),
        _prepared(
            "d", "<|user|><|audio_1|>x<|end|><|assistant|>", audios=[audio], adapter="speech", max_tokens=5
        ),
    ]
    out = stage(pa.Table.from_pylist(rows, schema=PREPARED_SCHEMA))
    assert out.schema == OUTPUT_SCHEMA
    got = out.to_pylist()
    assert [r["id"] for r in got] == ["a", "b", "c", "d"]
    assert [r["status"] for r in got] == ["ok", "error", "error", "ok"]
    assert got[1]["error_code"] == "IMAGE_DECODE_ERROR"
    assert got[2]["error_code"] == "ENGINE_ERROR" and "rejected" in got[2]["error_message"]
    assert got[0]["text"].startswith("len=") and got[0]["run_id"] == "r1"
    (batch,) = stage.engine.calls  # one batched call with the three ok rows
    assert len(batch) == 3
    assert (
        batch[2].adapter == "speech"
        and batch[2].sampling.max_tokens == 5
        and batch[2].audios[0]["frames"] == 98
    )


def test_engine_kwargs_from_config(tiny_model, tmp_path):
    cfg = make_config(tiny_model, tmp_path)
    kw = engine_kwargs(cfg)
    assert kw["enable_lora"] and kw["max_loras"] == 2
    assert kw["max_lora_rank"] == lora_rank_of(resolve_adapters(cfg.model)) == 8
    assert kw["mm_processor_kwargs"] == {"dynamic_hd": 1}
    assert kw["limit_mm_per_prompt"] == {"image": 1, "audio": 1}
    assert kw["trust_remote_code"] and kw["load_format"] == "dummy"
    no_lora = make_config(tiny_model, tmp_path, model={"use_lora": False})
    assert "enable_lora" not in engine_kwargs(no_lora)


def test_lora_rank_rounds_up_to_a_supported_rank(tmp_path):
    import json

    for name, r in (("vision", 256), ("speech", 300)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "adapter_config.json").write_text(json.dumps({"r": r}))
    assert lora_rank_of({n: tmp_path / n for n in ("vision", "speech")}) == 320
    (tmp_path / "speech" / "adapter_config.json").write_text(
        json.dumps({"r": 8, "rank_pattern": {"o_proj": 500}})
    )
    assert lora_rank_of({n: tmp_path / n for n in ("vision", "speech")}) == 512


class WindowEngine:
    """Transcribes window k as 'w{k-1} w{k}': neighbours share one word, as overlapping windows do."""

    def __init__(self, config):
        pass

    def stats(self):
        return {}

    def generate(self, requests):
        out = []
        for r in requests:
            k = int(np.frombuffer(r.audios[0]["features"], "<f4")[0]) if r.audios else 0
            out.append(
                EngineResult(
                    text=f"w{k - 1} w{k}",
                    prompt_tokens=10,
                    completion_tokens=2,
                    finish_reason="stop",
                    queued_s=0.1 * k,
                    engine_s=float(k),
                )
            )
        return out


def test_chunked_rows_become_one_stitched_output_row(tiny_model, tmp_path):
    stage = GenerateRows(make_config(tiny_model, tmp_path), run_id="r", engine_factory=WindowEngine)
    windows = [_audio(8, k) for k in (1, 2, 3)]
    rows = [
        _prepared(
            "long",
            "<|user|><|audio_1|>t<|end|><|assistant|>",
            audios=windows,
            audio_chunks=3,
            adapter="speech",
        ),
        _prepared("short", "<|user|><|audio_1|>t<|end|><|assistant|>", audios=windows[:1], adapter="speech"),
    ]
    out = stage(pa.Table.from_pylist(rows, schema=PREPARED_SCHEMA)).to_pylist()
    assert [r["id"] for r in out] == ["long", "short"]
    assert out[0]["text"] == "w0 w1 w2 w3" and out[0]["audio_chunks"] == 3
    assert (out[0]["prompt_tokens"], out[0]["completion_tokens"]) == (30, 6)
    assert out[0]["queue_s"] == pytest.approx(0.1) and out[0]["engine_s"] == 3.0  # first queued, last done
    assert out[1]["text"] == "w0 w1" and out[1]["audio_chunks"] is None


class CrashLedger:
    """A ledger that remembers earlier crashes, as the run's ledger actor would after actor restarts."""

    def __init__(self, attempts, deaths=None):
        """``attempts``: per row, its unfinished attempts (a count) or their holders (a list); ``deaths``:
        whose each dead holder's death was."""
        from actors.attempts import LocalAttemptLedger

        self.inner = LocalAttemptLedger((deaths or {}).get)
        for row_id, held in attempts.items():
            for holder in held if isinstance(held, list) else [None] * held:
                self.inner.start([row_id], holder)
        self.started = []

    def attempts(self, ids):
        return self.inner.attempts(ids)

    def start(self, ids):
        self.started.append(list(ids))
        self.inner.start(ids)

    def finish(self, ids):
        self.inner.finish(ids)

    def report(self, stage, actor, stats):
        if stage == "generate":  # the engine's figures (the stage also reports "progress" and "device")
            self.stats = stats


def test_suspects_run_alone_and_repeat_offenders_are_quarantined(tiny_model, tmp_path):
    ledger = CrashLedger({"once": 1, "twice": 2})
    stage = GenerateRows(
        make_config(tiny_model, tmp_path), run_id="r", engine_factory=EchoEngine, ledger=ledger
    )
    rows = [_prepared(i, f"<|user|>{i}<|end|><|assistant|>") for i in ("a", "once", "twice", "b")]
    out = stage(pa.Table.from_pylist(rows, schema=PREPARED_SCHEMA)).to_pylist()
    assert [r["status"] for r in out] == ["ok", "ok", "error", "ok"]
    assert out[2]["error_code"] == "ENGINE_CRASH_QUARANTINED"
    assert ledger.started == [["once"], ["a", "b"]]  # the suspect alone, first
    calls = stage.engine.calls
    assert [len(c) for c in calls] == [1, 2] and calls[0][0].alone and not calls[1][0].alone
    assert ledger.inner.attempts(["a", "once", "twice", "b"]) == [0, 0, 2, 0]
    assert ledger.stats == {"requests": 3}


def test_deaths_the_cluster_owns_are_not_held_against_the_rows_in_them(tiny_model, tmp_path):
    from actors.attempts import CLUSTER, SUSPECT

    # "oom" was in the engine at three deaths the cluster reports as its own (memory monitor kills, a lost
    # node); "crash" at one of those and at one nobody owns (a segfault); "busy" is in a live engine.
    ledger = CrashLedger(
        {"oom": ["oom-1", "oom-2", "node-lost"], "crash": ["oom-1", "segv"], "busy": ["alive"]},
        deaths={"oom-1": CLUSTER, "oom-2": CLUSTER, "node-lost": CLUSTER, "segv": SUSPECT},
    )
    stage = GenerateRows(
        make_config(tiny_model, tmp_path), run_id="r", engine_factory=EchoEngine, ledger=ledger
    )
    rows = [_prepared(i, f"<|user|>{i}<|end|><|assistant|>") for i in ("a", "oom", "crash", "busy")]
    out = stage(pa.Table.from_pylist(rows, schema=PREPARED_SCHEMA)).to_pylist()
    assert [r["status"] for r in out] == ["ok", "ok", "ok", "ok"]  # before: "oom" quarantined
    assert ledger.started == [["crash"], ["busy"], ["a", "oom"]]  # only deaths nobody owns make suspects
    assert ledger.inner.engine_deaths() == {"cluster": 3, "suspect": 1}


def test_prepared_rows_equal_to_pylist_without_copying_the_media():
    from actors.generate import prepared_rows

    canvas = {"canvas": bytes(range(256)) * 3, "width": 16, "height": 16, "mask": b"\x01" * 1024,
              "tokens": 273, "uuid": "u"}  # fmt: skip
    audios = [_audio(f, float(f)) for f in (3, 5, 7)]
    rows = [
        _prepared(str(i), "p", images=[canvas] if i % 3 else [], audios=audios[: i % 4] if i % 2 else None)
        for i in range(9)
    ]
    table = pa.concat_tables(
        [
            pa.Table.from_pylist(rows[:4], schema=PREPARED_SCHEMA),
            pa.Table.from_pylist(rows[4:], schema=PREPARED_SCHEMA),
        ]
    ).slice(1, 7)  # several chunks and an offset, as Ray Data hands batches over
    got = prepared_rows(table)

    def as_bytes(rows):
        for row in rows:
            for column, blob in (("images", "canvas"), ("audios", "features")):
                for item in row[column] or []:
                    item[blob] = bytes(item[blob])
        return rows

    views = [item["features"] for row in got for item in row["audios"] or []]
    data = [chunk.flatten().field("features").buffers()[2] for chunk in table.column("audios").chunks]
    assert views and all(  # each blob is a view into the table's own memory, not a copy
        any(d.address <= v.address and v.address + v.size <= d.address + d.size for d in data) for v in views
    )
    assert as_bytes(got) == table.to_pylist()


def test_rows_sharing_an_id_count_one_crash_once(tiny_model, tmp_path):
    ledger = CrashLedger({})
    stage = GenerateRows(
        make_config(tiny_model, tmp_path), run_id="r", engine_factory=EchoEngine, ledger=ledger
    )
    rows = [
        _prepared("dup", "<|user|>x<|end|><|assistant|>"),
        _prepared("dup", "<|user|>y<|end|><|assistant|>"),
    ]
    out = stage(pa.Table.from_pylist(rows, schema=PREPARED_SCHEMA)).to_pylist()
    assert [r["status"] for r in out] == ["ok", "ok"] and [r["id"] for r in out] == ["dup", "dup"]
    assert ledger.started == [["dup"]]  # had the engine died here, "dup" would be a suspect, not quarantined


def test_a_death_not_yet_known_when_its_row_came_back_is_counted_at_the_end():
    from actors.attempts import CLUSTER, LocalAttemptLedger

    known: dict = {}  # what the cluster has recorded so far
    ledger = LocalAttemptLedger(known.get)
    ledger.start(["r"], "node-1")  # the row is in an engine whose node is then lost
    ledger.start(["r"], "node-2")  # it came back before the loss was recorded: held against it once
    assert ledger.attempts(["r"]) == [2]
    ledger.finish(["r"])  # answered on node-2
    known["node-1"] = CLUSTER  # the loss reaches the records
    assert ledger.engine_deaths() == {"cluster": 1, "suspect": 0}  # before: 0, the death never counted
