"""The GPU stage: prepared rows -> output rows, through one engine per actor (``actors.engines``).

``GenerateRows`` is a plain callable class. Rows that arrive as errors pass through untouched; every
other row gets the engine's answer, an ENGINE_ERROR (the engine refused or failed that request), or
ENGINE_CRASH_QUARANTINED (see ``actors.attempts``), so each prepared row yields one output row.
"""

from __future__ import annotations

import importlib
import os
import socket

import numpy as np
import pyarrow as pa

from actors.attempts import QUARANTINE_AFTER, AttemptLedger, LocalAttemptLedger
from actors.chunks import stitch_texts
from actors.engines import build_engine
from actors.engines.contract import EngineFactory, EngineRequest, EngineResult
from schemas.job import JobConfig
from schemas.rows import OUTPUT_SCHEMA, ErrorCode, Status, output_row_from_prepared


def run_init_hook(spec: str | None) -> None:
    """Call the 'module:function' named by engine.init_hook (e.g. to register a model patch)."""
    if not spec:
        return
    module, _, func = spec.partition(":")
    if not func:
        raise ValueError(f"engine.init_hook {spec!r} must look like 'package.module:function'.")
    getattr(importlib.import_module(module), func)()


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
        finish_reason="length"
        if any(r.finish_reason == "length" for r in results)
        else results[-1].finish_reason,
        queued_s=results[0].queued_s,
        engine_s=max((r.engine_s or 0.0) for r in results),  # windows run side by side in the engine
    )


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
        self.engine = engine_factory(config)

    def __call__(self, batch: pa.Table) -> pa.Table:
        prepared = prepared_rows(batch)
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
                        "row beside it: it is set aside so the job can finish. Check its media and prompt."
                    ),
                )
            else:
                (suspects if tries else normal).append(i)
        # A row that was in the engine when it died runs alone, so a second crash names the culprit.
        for i in suspects:
            self._run([i], prepared, rows, alone=True)
        if normal:
            self._run(normal, prepared, rows, alone=False)
        self.ledger.report("generate", self.actor_key, self.engine.stats())
        return pa.Table.from_pylist(rows, schema=OUTPUT_SCHEMA)

    def _run(self, indices: list[int], prepared: list[dict], rows: list[dict], alone: bool) -> None:
        # once per id: rows sharing an id (duplicates in the input) count one crash once, not once each
        ids = list(dict.fromkeys(prepared[i]["id"] for i in indices))
        per_row = [EngineRequest.from_prepared(prepared[i], alone) for i in indices]
        self.ledger.start(ids)
        flat: list[EngineResult] = self.engine.generate([r for requests in per_row for r in requests])
        self.ledger.finish(ids)
        if len(flat) != sum(map(len, per_row)):  # an engine that loses requests must never lose rows
            raise RuntimeError(f"engine returned {len(flat)} results for {sum(map(len, per_row))} requests")
        offsets = np.cumsum([0] + [len(r) for r in per_row])
        results = [merge_results(flat[a:b]) for a, b in zip(offsets[:-1], offsets[1:], strict=True)]
        for i, result in zip(indices, results, strict=True):
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
            )
