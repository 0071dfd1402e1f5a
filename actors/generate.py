"""The GPU stage: prepared rows -> output rows, through one engine per actor (``actors.engines``).

``GenerateRows`` is a plain callable class. Rows that arrive as errors pass through untouched; every
other row gets the engine's answer, an ENGINE_ERROR (the engine refused or failed that request), or
ENGINE_CRASH_QUARANTINED (see ``actors.attempts``), so each prepared row yields one output row.
"""

from __future__ import annotations

import importlib
import os
import socket
import sys
import threading
import time
from collections import Counter

import numpy as np
import pyarrow as pa

from actors.attempts import QUARANTINE_AFTER, AttemptLedger, LocalAttemptLedger
from actors.engines import build_engine
from actors.engines.contract import EngineFactory, EngineRequest, EngineResult
from actors.media.chunks import stitch_texts
from actors.multitask import finish_row, run_task_rows
from actors.output_check import choice_probs, verdict
from schemas.job import JobConfig
from schemas.multitask import TASK_PREFIX
from schemas.output import carried_names
from schemas.rows import OUTPUT_SCHEMA, TASK_RESULT, ErrorCode, Status, output_row_from_prepared


def run_init_hook(spec: str | None) -> None:
    """Call the 'module:function' named by engine.init_hook (e.g. to register a model patch)."""
    if not spec:
        return
    module, _, func = spec.partition(":")
    if not func:
        raise ValueError(f"engine.init_hook {spec!r} must look like 'package.module:function'.")
    getattr(importlib.import_module(module), func)()


def device_info() -> dict:
    """Where this GPU actor runs, for the run's provenance: its host and accelerator."""
    import platform

    import torch

    cuda = torch.cuda.is_available()
    return {
        "host": socket.gethostname(),
        "machine": platform.machine(),
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "device_count": torch.cuda.device_count() if cuda else 0,
        "cuda": torch.version.cuda if cuda else None,
    }


# the large binary field of each media struct (schemas.rows.PREPARED_IMAGE / PREPARED_AUDIO)
MEDIA_BLOBS = {"images": "canvas", "audios": "features"}


def prepared_rows(batch: pa.Table) -> list[dict]:
    """``batch.to_pylist()``, except that the media blobs (megabytes per image) stay in Arrow's memory:
    each is a zero-copy ``pyarrow.Buffer`` slice that the engine views as a tensor. Copying them out
    (``to_pylist``, or even a binary scalar) costs the GPU actor ~4 ms of CPU per 1080p image at
    dynamic_hd 16."""
    rows = batch.drop_columns(list(MEDIA_BLOBS)).to_pylist()
    for column, blob in MEDIA_BLOBS.items():
        per_row = [items for chunk in batch.column(column).chunks for items in _media_chunk(chunk, blob)]
        for row, items in zip(rows, per_row, strict=True):
            row[column] = items
    return rows


def _media_chunk(chunk: pa.ListArray, blob: str) -> list[list[dict] | None]:
    items = chunk.flatten()  # the rows' structs, one after another (slicing applied)
    names = [f.name for f in items.type]
    fields = dict(zip(names, items.flatten(), strict=True))
    blobs = fields.pop(blob)
    small = pa.StructArray.from_arrays(list(fields.values()), names=list(fields)).to_pylist()
    offsets = np.frombuffer(blobs.buffers()[1], dtype=np.int64)[blobs.offset : blobs.offset + len(blobs) + 1]
    data = blobs.buffers()[2]
    for j, item in enumerate(small):
        item[blob] = data.slice(int(offsets[j]), int(offsets[j + 1] - offsets[j]))
    out, k = [], 0
    for n, valid in zip(chunk.value_lengths().to_pylist(), chunk.is_valid().to_pylist(), strict=True):
        out.append(small[k : k + n] if valid else None)
        k += n or 0
    return out


def merge_results(results: list[EngineResult]) -> EngineResult:
    """One row's result from its windows' results, in order; any failed window fails the row."""
    if len(results) == 1:
        return results[0]
    for n, result in enumerate(results, start=1):
        if result.error is not None:
            return EngineResult(error=f"window {n} of {len(results)}: {result.error}")
    return EngineResult(
        text=stitch_texts([r.text for r in results]),
        prompt_tokens=sum(r.prompt_tokens for r in results),
        completion_tokens=sum(r.completion_tokens for r in results),
        # a window cut off or stopped as a loop marks the whole row (and counts in the run summary)
        finish_reason=next(
            (f for f in ("length", "repetition") if any(r.finish_reason == f for r in results)),
            results[-1].finish_reason,
        ),
        queued_s=results[0].queued_s,
        engine_s=max((r.engine_s or 0.0) for r in results),  # windows run side by side in the engine
        **_merged_confidence(results),
    )


def _merged_confidence(results: list[EngineResult]) -> dict:
    """The windows' confidence as one answer's: the token-weighted mean, the lowest minimum."""
    if any(r.logprob_mean is None for r in results):
        return {}
    tokens = sum(r.completion_tokens or 0 for r in results) or 1
    return {
        "logprob_mean": sum(r.logprob_mean * (r.completion_tokens or 0) for r in results) / tokens,
        "logprob_min": min(r.logprob_min for r in results),
    }


def run_metrics(run_id: str, actor_key: str):
    """The run's Ray metrics (``actors.run_metrics``) in a Ray worker; None elsewhere (a unit test)."""
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return None
    from actors.run_metrics import RunMetrics

    return RunMetrics(run_id, actor_key)


class GenerateRows:
    """Runs the ok rows of a batch through the engine: rows suspected of crashing it one at a time and
    alone, the rest together; rows that crashed it twice are quarantined without running."""

    def __init__(
        self,
        config: JobConfig,
        run_id: str,
        engine_factory: EngineFactory = build_engine,
        ledger: AttemptLedger | None = None,
    ):
        run_init_hook(config.engine.init_hook)
        self.config = config
        self.run_id = run_id
        self.ledger = ledger or LocalAttemptLedger()
        self.actor_key = f"{socket.gethostname()}:{os.getpid()}"
        # progress lines say an engine is starting (a minute or more on a GPU) until its stats replace this
        self.ledger.report("generate", self.actor_key, {"starting_since": round(time.time(), 3)})
        self.engine = engine_factory(config)
        self.metrics = run_metrics(run_id, self.actor_key)
        self._report_engine()
        self._done_lock = threading.Lock()
        self.done = {"rows": 0, "ok": 0, "error_codes": Counter(), "prompt_tokens": 0, "completion_tokens": 0}
        self.ledger.report("device", self.actor_key, device_info())

    def __call__(self, batch: pa.Table) -> pa.Table:
        carried = carried_names(batch)  # input columns the output carries: passed on as they are
        prepared = prepared_rows(batch.drop_columns(carried))
        rows = [output_row_from_prepared(p, self.config.model_name, self.run_id) for p in prepared]
        todo = [i for i, p in enumerate(prepared) if p["status"] == Status.OK.value]
        attempts = self.ledger.attempts([prepared[i]["id"] for i in todo])
        normal, suspects = [], []
        for i, tries in zip(todo, attempts, strict=True):
            if tries >= QUARANTINE_AFTER:
                rows[i].update(
                    status=Status.ERROR.value,
                    error_code=ErrorCode.ENGINE_CRASH_QUARANTINED.value,
                    error_message=(
                        f"the engine died {tries} times while this row was in it, the last time with no other "
                        "row beside it (deaths Ray reports as the cluster's, such as out-of-memory kills or a "
                        "lost node, are not counted): it is set aside so the job can finish. Check its media "
                        "and prompt."
                    ),
                )
            else:
                (suspects if tries else normal).append(i)
        # A row that was in the engine when it died runs alone, so a second crash names the culprit.
        for i in suspects:
            self._run([i], prepared, rows, alone=True)
        if normal:
            self._run(normal, prepared, rows, alone=False)
        self._report_engine()
        names = list(self.config.tasks or {})
        for row, p in zip(rows, prepared, strict=True):
            if names and TASK_PREFIX + names[0] not in row:  # error rows, quarantined rows
                finish_row(row, p, {}, names)
        self._count(rows)
        out = pa.Table.from_pylist(rows, schema=OUTPUT_SCHEMA)
        for name in names:
            column = pa.array([row[TASK_PREFIX + name] for row in rows], type=TASK_RESULT)
            out = out.append_column(pa.field(TASK_PREFIX + name, TASK_RESULT), column)
        for name in carried:
            out = out.append_column(name, batch.column(name))
        return out

    def _count(self, rows: list[dict]) -> None:
        """This actor's rows so far, for the run's progress (``pipelines.progress``): rows, ok, error codes,
        tokens. A batch counts once it is answered; a batch a crashed actor held counts when retried."""
        with self._done_lock:  # concurrent batches run in threads of this actor
            done = self.done
            done["rows"] += len(rows)
            done["ok"] += sum(r["status"] == Status.OK.value for r in rows)
            done["error_codes"].update(r["error_code"] for r in rows if r["status"] != Status.OK.value)
            done["prompt_tokens"] += sum(r["prompt_tokens"] or 0 for r in rows)
            done["completion_tokens"] += sum(r["completion_tokens"] or 0 for r in rows)
            report = {**done, "error_codes": dict(done["error_codes"])}
        self.ledger.report("progress", self.actor_key, report)
        if self.metrics is not None:
            self.metrics.record_rows(rows)

    def _report_engine(self) -> None:
        stats = self.engine.stats()
        self.ledger.report("generate", self.actor_key, stats)
        if self.metrics is not None:
            self.metrics.record_engine(stats)

    def _run(self, indices: list[int], prepared: list[dict], rows: list[dict], alone: bool) -> None:
        # once per id: rows sharing an id (duplicates in the input) count one crash once, not once each
        ids = list(dict.fromkeys(prepared[i]["id"] for i in indices))
        if self.config.tasks:
            self.ledger.start(ids)
            run_task_rows(self.engine, indices, prepared, rows, self.config, alone)
            self.ledger.finish(ids)
            return
        per_row = [EngineRequest.from_prepared(prepared[i], alone) for i in indices]
        self.ledger.start(ids)
        flat: list[EngineResult] = self.engine.generate([r for requests in per_row for r in requests])
        self.ledger.finish(ids)
        if len(flat) != sum(map(len, per_row)):  # an engine that loses requests must never lose rows
            raise RuntimeError(f"engine returned {len(flat)} results for {sum(map(len, per_row))} requests")
        offsets = np.cumsum([0] + [len(r) for r in per_row])
        results = [merge_results(flat[a:b]) for a, b in zip(offsets[:-1], offsets[1:], strict=True)]
        for i, result, requests in zip(indices, results, per_row, strict=True):
            row = rows[i]
            if result.error is not None:
                row.update(
                    status=Status.ERROR.value,
                    error_code=ErrorCode.ENGINE_ERROR.value,
                    error_message=f"the engine rejected or failed this request: {result.error}",
                    text=None,
                )
                continue
            row.update(
                text=result.text,
                prompt_tokens=result.prompt_tokens,
                completion_tokens=result.completion_tokens,
                finish_reason=result.finish_reason,
                queue_s=result.queued_s,
                engine_s=result.engine_s,
                logprob_mean=result.logprob_mean,
                logprob_min=result.logprob_min,
            )
            spec = requests[0].structured
            if spec is None:
                continue
            row["choice_probs"] = choice_probs(spec, result.choice_probs)
            if (wrong := verdict(result.text, result.finish_reason, spec)) is not None:
                code, message = wrong
                row.update(status=Status.ERROR.value, error_code=code.value, error_message=message)
