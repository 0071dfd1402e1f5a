"""The CPU stage: input rows -> prepared rows (the model's media inputs, prompt, exact token count) or
error rows. Media leave this stage as what the model consumes (``actors.media.features``), not as files.

``PreprocessRows`` is a plain callable class: ``PreprocessRows(config)(pyarrow_table) -> pyarrow_table``.
It never raises for a bad row and returns exactly one prepared row per input row, in order.

Rows are untrusted (docs/security.md, "Security: rows are untrusted"): media paths stay inside the trust boundary
(``actors.media.policy``), media sizes are capped before decoding (``actors.media.decode``), and each row has a
time limit (``RowTimer``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable

import pyarrow as pa
from pydantic import ValidationError

from actors.attempts import AttemptLedger
from actors.media.chunks import chunk_waveform
from actors.media.decode import (
    DecodedImage,
    MediaSource,
    as_items,
    decode_image,
    default_media_root,
    downscale,
    downscale_size,
    letterbox,
    load_audio,
    load_bytes,
    remote_media,
)
from actors.media.features import image_canvas, log_mel
from actors.multitask import jobs_reads, task_entry
from actors.prompt import PromptTokenCounter, build_prompt, instruction_for, modality_of, task_instruction
from actors.row_timer import RowTimer
from actors.tokens import fitted_size, letterbox_size, num_audio_tokens, num_image_tokens
from schemas.annotation import STRUCTURED_CELL_CHARS, StructuredSpec, schema_keywords
from schemas.job import JobConfig
from schemas.model import PHI4MM
from schemas.output import carry
from schemas.redact import RedactingFilter, redact
from schemas.rows import PREPARED_SCHEMA, ErrorCode, RowError, Status, empty_prepared_row
from schemas.sampling import RowSampling

logger = logging.getLogger(__name__)
logger.addFilter(RedactingFilter())  # a failure's traceback may quote a row's presigned URL


def _sizes(images: list[DecodedImage]) -> list[tuple[int, int]]:
    return [(im.width, im.height) for im in images]


def load_tokenizer(config: JobConfig):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(config.model.path, trust_remote_code=config.model.trust_remote_code)


def prepared_image(image: DecodedImage, dynamic_hd: int, where: str = "") -> dict:
    """A decoded image -> its ``PREPARED_IMAGE`` value (see ``actors.media.features``)."""
    canvas = image_canvas(image.image, dynamic_hd, where, size=(image.width, image.height))
    height, width = canvas.pixels.shape[:2]
    return {
        "canvas": canvas.pixels.tobytes(),
        "width": width,
        "height": height,
        "mask": canvas.mask.tobytes(),
        "tokens": canvas.num_tokens,
        # the same encoded bytes at the same size, decode scale and dynamic_hd always give the same canvas
        "uuid": f"{image.digest}-{image.width}x{image.height}-s{image.jpeg_scale}-hd{dynamic_hd}",
    }


def prepared_audio(clip, with_images: bool = False) -> dict:
    """A 16 kHz clip -> its ``PREPARED_AUDIO`` value: log-mel features and their content hash."""
    features = log_mel(clip).astype("<f4", copy=False)
    data = features.tobytes()
    digest = hashlib.blake2b(data, digest_size=16).hexdigest()
    # the key includes the projection: the same clip beside an image is encoded differently
    uuid = f"{digest}-{'vision' if with_images else 'speech'}"
    return {"features": data, "frames": len(features), "uuid": uuid, "with_images": with_images}


class PreprocessRows:
    """Decode media, build the Phi-4-mm prompt, count its tokens and check the budget, row by row."""

    def __init__(
        self,
        config: JobConfig,
        tokenizer_factory: Callable[[JobConfig], object] = load_tokenizer,
        ledger: AttemptLedger | None = None,
    ):
        self.config = config
        self.ledger = ledger  # where this actor reports its work, so the run can tell an idle CPU pool
        self.actor_key = f"{socket.gethostname()}:{os.getpid()}"
        self.stats = {"batches": 0, "rows": 0, "busy_s": 0.0}
        self.columns = config.input.columns
        job_spec = config.structured
        self.structured = (
            StructuredSpec(**{job_spec.kind: getattr(job_spec, job_spec.kind)}) if job_spec else None
        )
        self.source = MediaSource(
            media_root=config.input.media_root or default_media_root(config.input.path),
            allow_http=config.input.allow_http,
            allowed_roots=tuple(config.input.allowed_media_roots),
            remote_protocols=tuple(config.input.remote_protocols),
            max_bytes=config.media.max_media_bytes,
            remote_timeout_s=config.media.remote_timeout_s,
            remote_attempts=config.media.remote_attempts,
            remote_concurrency=config.media.remote_concurrency,
            storage=config.storage,
        )
        self.counter = PromptTokenCounter(tokenizer_factory(config))
        # An abandoned row's thread may still be counting: a fast tokenizer must not be used by two at once.
        self._counter_lock = threading.Lock()
        self.timer = RowTimer(config.media.preprocess_timeout_s)

    def __call__(self, batch: pa.Table) -> pa.Table:
        started = time.perf_counter()
        pylist = batch.to_pylist()
        self.source.fetcher.prefetch(remote_media(pylist, self.columns, self.source))  # all at once, bounded
        try:
            rows = [self.timer.run(self.prepare, row, row.get(self.columns.id)) for row in pylist]
        finally:
            self.source.fetcher.forget()
        out = carry(
            batch, pa.Table.from_pylist(rows, schema=PREPARED_SCHEMA), self.config.output.carry_columns
        )
        self.stats["batches"] += 1
        self.stats["rows"] += len(rows)
        self.stats["busy_s"] += time.perf_counter() - started
        if self.ledger is not None:
            self.ledger.report("preprocess", self.actor_key, self.report())
        return out

    def report(self) -> dict:
        """This actor's figures for the run summary's ``cpu_actors``: batches, rows and busy seconds so far,
        plus the time limit's ``RowTimer.stats``."""
        return {**self.stats, "busy_s": round(self.stats["busy_s"], 2), **self.timer.stats()}

    def prepare(self, row: dict) -> dict:
        """One input row -> one prepared row; every failure becomes an error row with a stable code. No time
        limit here: ``__call__`` runs it under ``RowTimer``."""
        started = time.thread_time()  # this row's own CPU time, not an abandoned row's beside it
        row_id = row.get(self.columns.id)
        out = empty_prepared_row(None if row_id is None else str(row_id))
        try:
            if row_id is None or str(row_id) == "":
                raise RowError(
                    ErrorCode.MISSING_ID, f"the row has no value in id column {self.columns.id!r}."
                )
            self._prepare_into(row, out)
        except RowError as e:
            out.update(status=Status.ERROR.value, error_code=e.code.value, error_message=e.message)
        except Exception as e:  # a bug or an input nobody foresaw must still yield a row, not kill the job
            logger.exception("unexpected preprocessing failure for row %r", row_id)
            out.update(
                status=Status.ERROR.value,
                error_code=ErrorCode.PREPROCESS_ERROR.value,
                error_message=redact(
                    f"unexpected {type(e).__name__}: {e}. This is a bug; please report it with the row."
                ),
            )
        if out["status"] == Status.ERROR.value:
            out.update(images=None, audios=None, prompt=None)
        out["preprocess_s"] = time.thread_time() - started
        return out

    def _prepare_into(self, row: dict, out: dict) -> None:
        """The row's steps, in order: each raises ``RowError`` for the whole row; with several tasks, a task
        that cannot run is that task's error, and the row is an error of every task when none can."""
        tasks = self.config.tasks
        image_items, audio_items, user_text = self._media_items(row)
        instruction, instructions = self._instructions(row, image_items, audio_items)
        if tasks and instruction is None:
            out["tasks"] = [task_entry(name, error=e) for name, e in instructions.items()]
            return
        self._check_row_shape(image_items, audio_items, instruction or user_text)
        images = self._decode_images(image_items, out)
        audios = self._decode_audios(row, audio_items)
        prompts = self._task_prompts(instructions, len(images), len(audios))
        if tasks and not prompts:
            out["tasks"] = [task_entry(name, error=e) for name, e in instructions.items()]
            return
        prompt = self._row_prompt(prompts, instruction, user_text, len(images), len(audios))
        self._read_sampling(row, out)
        out["structured"] = self._read_structured(row)
        clips, chunked = self._clips(images, audios)
        images, counts = self._fit_budget(prompt, images, clips, chunked, out)
        if tasks:
            # the longest prompt is counted already, with the row's final media (one request unless chunked)
            known = {} if chunked else {prompt: counts[0]}
            out["tasks"] = [
                self._task_entry(
                    name, prompts.get(name), instructions[name], images, clips, out["max_tokens"], known
                )
                for name in tasks
            ]
            prompt, counts = None, [sum(t["prompt_tokens"] or 0 for t in out["tasks"])]
        out.update(
            prompt=prompt,
            images=[
                prepared_image(im, self.config.engine.dynamic_hd, f"#{n}")
                for n, im in enumerate(images, start=1)
            ],
            audios=[prepared_audio(clip, with_images=bool(images)) for clip in clips],
            audio_chunks=len(clips) if chunked else None,
            adapter=PHI4MM.adapter_for(len(images), len(audios)) if self.config.model.use_lora else None,
            prompt_tokens=sum(counts),
            num_images=len(images),
            num_audios=len(audios),
            audio_seconds=sum(a.seconds for a in audios),
        )

    def _media_items(self, row: dict) -> tuple[list, list, object]:
        """The row's image and audio items the job reads (a task reads only the media it asks about), and
        its prompt column's value when no task replaces it."""
        cols, task, tasks = self.columns, self.config.task, self.config.tasks
        reads = task.reads if task else jobs_reads(tasks)
        image_items = as_items(row.get(cols.image)) if cols.image and reads != "audio" else []
        audio_items = as_items(row.get(cols.audio)) if cols.audio and reads != "image" else []
        user_text = row.get(cols.prompt) if cols.prompt and not (task or tasks) else None
        return image_items, audio_items, user_text

    def _instructions(self, row: dict, image_items: list, audio_items: list) -> tuple[str | None, dict]:
        """The task's instruction (None without one; with several tasks, the first that can run, None when
        none can) and, with several tasks, each one's instruction or error. Before decoding: a missing cell
        costs nothing."""
        task, tasks = self.config.task, self.config.tasks
        if task:
            self._check_task_media(task, image_items, audio_items)
            return task_instruction(task, row), {}
        if tasks:
            instructions = {
                name: self._try_task(t, row, image_items, audio_items) for name, t in tasks.items()
            }
            good = [i for i in instructions.values() if isinstance(i, str)]
            return (good[0] if good else None), instructions
        return None, {}

    def _decode_images(self, image_items: list, out: dict) -> list[DecodedImage]:
        """The row's pictures decoded (at a reduced JPEG scale where it still covers the crop grid), and
        letterboxed with ``media.image_aspect: pad`` (noted in ``out``'s media_adjustments)."""
        media_cfg = self.config.media
        reduce_to = self._fitted_size if media_cfg.fast_jpeg_decode else None
        images = [
            decode_image(
                *load_bytes(item, self.source, "image"),
                media_cfg.max_image_pixels,
                reduce_to,
                max_bytes=media_cfg.max_image_bytes,
            )
            for item in image_items
        ]
        if media_cfg.image_aspect == "pad":
            images, padded = self._letterboxed(images)
            out["media_adjustments"] = padded
        return images

    def _decode_audios(self, row: dict, audio_items: list) -> list:
        """The row's clips decoded to 16 kHz mono (a float array with the row's sampling-rate column)."""
        media_cfg, cols = self.config.media, self.columns
        rate = row.get(cols.sampling_rate) if cols.sampling_rate else None
        return [
            load_audio(
                item,
                self.source,
                rate,
                media_cfg.min_audio_seconds,
                media_cfg.max_audio_seconds,
                max_samples=media_cfg.max_audio_samples,
            )
            for item in audio_items
        ]

    def _task_prompts(self, instructions: dict, num_images: int, num_audios: int) -> dict[str, str]:
        """Each task's prompt, the same media tags first in every one (the engine's prefix and encoder caches
        are shared); a task whose prompt is refused gets that error in ``instructions``."""
        prompts = {}
        for name, i in instructions.items():
            try:
                if isinstance(i, str):
                    prompts[name] = self._prompt(i, num_images, num_audios)
            except RowError as e:  # that task's error only
                instructions[name] = e
        return prompts

    def _row_prompt(self, prompts: dict, instruction, user_text, num_images: int, num_audios: int) -> str:
        """The prompt the token budget is checked with: the row's own, or with tasks the longest one (it
        decides whether images are downscaled to fit)."""
        if self.config.tasks:
            return max(prompts.values(), key=len)
        modality = modality_of(num_images, num_audios)
        text = instruction or instruction_for(user_text, modality, self.config.prompt)
        return self._prompt(text, num_images, num_audios)

    def _clips(self, images: list, audios: list) -> tuple[list, bool]:
        """The clips the engine gets, and whether they are one long clip's windows (``media.long_audio:
        chunk``: an audio-only row with one clip longer than a window)."""
        media_cfg = self.config.media
        clips = [a.samples for a in audios]
        if media_cfg.long_audio == "chunk" and not images and len(audios) == 1:
            clips = chunk_waveform(
                audios[0].samples, media_cfg.chunk_seconds, media_cfg.chunk_overlap_seconds
            )
            return clips, len(clips) > 1
        return clips, False

    def _fit_budget(
        self, prompt: str, images: list, clips: list, chunked: bool, out: dict
    ) -> tuple[list, list]:
        """The row's images (downscaled to fit with ``media.image_over_budget: downscale``) and the token
        count of each request; ``PROMPT_TOO_LONG`` when a request is still over the budget (without tasks:
        a task over it is that task's error)."""
        media_cfg, engine = self.config.media, self.config.engine
        budget = engine.max_model_len - self.config.max_tokens(out["max_tokens"])
        # A chunked row is one request per window: each window's prompt must fit on its own.
        requests = [[clip] for clip in clips] if chunked else [clips]
        counts = [self._count(prompt, _sizes(images), r) for r in requests]
        if max(counts) > budget and images and media_cfg.image_over_budget == "downscale":
            images, downscaled = self._downscale_to_fit(prompt, images, clips, budget)
            out["media_adjustments"] = "; ".join(filter(None, [out["media_adjustments"], downscaled])) or None
            counts = [self._count(prompt, _sizes(images), clips)]
        if max(counts) > budget and not self.config.tasks:
            what = "its longest window takes" if chunked else "the prompt takes"
            raise RowError(
                ErrorCode.PROMPT_TOO_LONG,
                f"{what} {max(counts)} tokens, and with max_tokens "
                f"{engine.max_model_len - budget} that is over engine.max_model_len ({engine.max_model_len}). "
                "Try a smaller engine.dynamic_hd or media.image_over_budget: downscale, shorter audio or "
                "media.long_audio: chunk, a lower max_tokens, or a larger max_model_len.",
            )
        return images, counts

    def _fitted_size(self, width: int, height: int) -> tuple[int, int]:
        """The size the picture's own pixels end up at in the canvas (what a reduced-scale decode needs)."""
        dynamic_hd = self.config.engine.dynamic_hd
        if self.config.media.image_aspect == "pad":  # the padded picture is fitted; the content scales alike
            padded = letterbox_size(width, height, dynamic_hd)
            factor = fitted_size(*padded, dynamic_hd)[1][0] / padded[0]
            return max(1, int(width * factor)), max(1, int(height * factor))
        return fitted_size(width, height, dynamic_hd)[1]

    def _letterboxed(self, images: list[DecodedImage]) -> tuple[list[DecodedImage], str | None]:
        """Pictures too elongated for the crop grid, padded white on their short side (media.image_aspect)."""
        out, notes = [], []
        for n, image in enumerate(images, start=1):
            size = letterbox_size(image.width, image.height, self.config.engine.dynamic_hd)
            if size != (image.width, image.height):
                notes.append(
                    f"image #{n} letterboxed {image.width}x{image.height} -> {size[0]}x{size[1]} (too elongated for the crop grid)"
                )
            out.append(letterbox(image, size))
        return out, "; ".join(notes) or None

    def _try_task(self, task, row: dict, image_items: list, audio_items: list) -> str | RowError:
        """One task's instruction for the row, or the error that keeps the task from running on it."""
        try:
            self._check_task_media(task, image_items, audio_items)
            return task_instruction(task, row)
        except RowError as e:
            return e

    def _task_entry(self, name, prompt, instruction, images, clips, row_max_tokens, known: dict) -> dict:
        """A task's ``PREPARED_TASK``: its prompt and exact count, or its error (its own or too long).
        ``known``: prompts of this row already counted with these media, and their counts."""
        if prompt is None:
            return task_entry(name, error=instruction)
        count = known[prompt] if prompt in known else self._count(prompt, _sizes(images), clips)
        max_tokens = self.config.max_tokens(row_max_tokens, name)
        if count + max_tokens > self.config.engine.max_model_len:
            return task_entry(name, error=RowError(
                ErrorCode.PROMPT_TOO_LONG,
                f"the {name} task's prompt takes {count} tokens, and with max_tokens {max_tokens} that is over "
                f"engine.max_model_len ({self.config.engine.max_model_len}). Try a lower tasks.{name}.max_tokens "
                "or a larger max_model_len.",
            ))  # fmt: skip
        return task_entry(name, prompt=prompt, prompt_tokens=count)

    def _check_task_media(self, task, image_items: list, audio_items: list) -> None:
        if task.reads != "any" and not (image_items if task.reads == "image" else audio_items):
            column = self.columns.image if task.reads == "image" else self.columns.audio
            raise RowError(
                ErrorCode.MISSING_INPUT,
                f"the {task.preset} task reads the row's {task.reads} (column {column!r}), and it has none. "
                f"Try giving the row an {task.reads}, or task.preset custom for mixed rows.",
            )

    def _check_row_shape(self, image_items: list, audio_items: list, user_text) -> None:
        """What can be told before decoding anything: the prompt's type, an empty row, too many items."""
        engine = self.config.engine
        if user_text is not None and not isinstance(user_text, str):
            raise RowError(
                ErrorCode.INVALID_INPUT,
                f"prompt column {self.columns.prompt!r} holds {type(user_text).__name__}, not text.",
            )
        if not image_items and not audio_items and not (user_text and user_text.strip()):
            raise RowError(
                ErrorCode.MISSING_INPUT,
                "the row has no image, no audio and no prompt text: there is nothing to ask the model.",
            )
        for kind, items, limit in (("image", image_items, engine.max_images_per_row),
                                   ("audio", audio_items, engine.max_audios_per_row)):  # fmt: skip
            if len(items) > limit:
                raise RowError(
                    ErrorCode.TOO_MANY_MEDIA,
                    f"the row has {len(items)} {kind} items; the engine accepts {limit} per row. "
                    f"Try raising engine.max_{kind}s_per_row.",
                )

    def _prompt(self, instruction: str, num_images: int, num_audios: int) -> str:
        """The row's prompt, its instruction defused; INVALID_INPUT when its token ids still hold a special
        token the code did not put there, or lack one it did."""
        system, specials = self.config.prompt.system, self.counter.special_tokens
        prompt = build_prompt(instruction, num_images, num_audios, system, specials)
        with self._counter_lock:
            self.counter.check(prompt, build_prompt("", num_images, num_audios, system, specials))
        return prompt

    def _count(self, prompt: str, image_sizes: list[tuple[int, int]], clips: list) -> int:
        dynamic_hd = self.config.engine.dynamic_hd
        with self._counter_lock:
            return self.counter.count(
                prompt,
                [num_image_tokens(w, h, dynamic_hd) for w, h in image_sizes],
                [num_audio_tokens(len(clip)) for clip in clips],
            )

    def _downscale_to_fit(self, prompt, images, clips, budget) -> tuple[list[DecodedImage], str | None]:
        """Shrink every image by the same factor, in 10% steps, until the row fits. Only images wider or
        taller than one 448 px crop can shrink their token count; the rest come back unchanged."""
        scale = 1.0
        while scale > 0.01:
            scale *= 0.9
            smaller = [downscale_size(im, scale) for im in images]
            if self._count(prompt, smaller, clips) <= budget:
                before = ", ".join(f"{w}x{h}" for w, h in _sizes(images))
                after = ", ".join(f"{w}x{h}" for w, h in smaller)
                note = f"image downscaled {before} -> {after} to fit the token budget"
                return [downscale(im, scale) for im in images], note
        return images, None

    def _read_structured(self, row: dict) -> str | None:
        """The row's structured output (its input.columns.structured cell, else the job's), as JSON."""
        column = self.columns.structured
        cell = row.get(column) if column else None
        if cell is None:
            return self.structured.to_json() if self.structured else None
        if isinstance(cell, (str, bytes)) and len(cell) > STRUCTURED_CELL_CHARS:
            raise RowError(
                ErrorCode.INVALID_STRUCTURED,
                f"column {column!r} holds {len(cell):,} characters, over the {STRUCTURED_CELL_CHARS:,} a row's "
                "structured output may take. Try a smaller schema or choice list, or the job's structured.",
            )
        try:
            spec = StructuredSpec.model_validate(json.loads(cell) if isinstance(cell, str) else cell)
            patterns = spec.json_schema is not None and any(
                key in ("pattern", "patternProperties") for key, _ in schema_keywords(spec.json_schema)
            )
        except (ValueError, ValidationError, RecursionError) as e:
            reason = (
                e.errors()[0]["msg"] if isinstance(e, ValidationError)
                else "nested too deeply" if isinstance(e, RecursionError) else str(e)
            )  # fmt: skip
            raise RowError(
                ErrorCode.INVALID_STRUCTURED,
                f"column {column!r} holds {cell!r:.200}: {reason}. Try a JSON object with one of json_schema "
                "or choice, or null for the job's structured.",
            ) from None
        if patterns:  # jsonschema checks them with Python's re too
            raise RowError(
                ErrorCode.INVALID_STRUCTURED,
                f"column {column!r} asks a json_schema with pattern or patternProperties: a row's patterns "
                "would run in Python's backtracking re when the answer is checked, where a hostile one can "
                "stall the run. Try them in the job's structured.json_schema, or a schema without patterns.",
            )
        if spec.regex is not None:  # rows are untrusted: a pattern such as (a+)+b stalls Python's re
            raise RowError(
                ErrorCode.INVALID_STRUCTURED,
                f"column {column!r} asks a regex: a row's pattern would run in Python's backtracking re when "
                "the answer is checked, where a hostile one can stall the stage. Try structured.regex in the "
                "job's config, or a choice list or json_schema in the cell.",
            )
        return spec.to_json()

    def _read_sampling(self, row: dict, out: dict) -> None:
        """The row's sampling columns, validated with the engine contract's ``RowSampling``."""
        columns = {name: getattr(self.columns, name) for name in RowSampling.model_fields}
        given = {name: row.get(col) for name, col in columns.items() if col and row.get(col) is not None}
        try:
            out.update(RowSampling.model_validate(given).model_dump(exclude_none=True))
        except ValidationError as e:
            error = e.errors()[0]
            name = error["loc"][0]
            raise RowError(
                ErrorCode.INVALID_SAMPLING,
                f"column {columns[name]!r} holds {given[name]!r:.200}; {name}: {error['msg']}. "
                f"Try a value within its bounds ({RowSampling.model_fields[name].description}) or null for "
                f"the job's sampling.{name}.",
            ) from None
