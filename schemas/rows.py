"""Row contracts: the input columns a job reads, the prepared rows between the CPU and GPU stages,
and the output Arrow schema every job writes. Stable error codes live here too.

Media columns follow Hugging Face datasets' storage type, ``struct<bytes: binary, path: string>``;
plain ``binary`` and plain path strings are accepted as well (see ``actors.media.decode``).
"""

from __future__ import annotations

from enum import Enum

import pyarrow as pa

from schemas.multitask import CHOICE_PROB, PREPARED_TASK
from schemas.redact import redact
from schemas.sampling import RowSampling


class Status(str, Enum):
    OK = "ok"
    ERROR = "error"


class ErrorCode(str, Enum):
    """Stable codes of error rows. Codes are never renamed; new ones are only added (see CHANGELOG)."""

    MISSING_ID = "MISSING_ID"
    MISSING_INPUT = "MISSING_INPUT"
    INVALID_INPUT = "INVALID_INPUT"
    MEDIA_NOT_FOUND = "MEDIA_NOT_FOUND"
    IMAGE_DECODE_ERROR = "IMAGE_DECODE_ERROR"
    IMAGE_TOO_LARGE = "IMAGE_TOO_LARGE"
    IMAGE_ASPECT_RATIO_UNSUPPORTED = "IMAGE_ASPECT_RATIO_UNSUPPORTED"
    AUDIO_DECODE_ERROR = "AUDIO_DECODE_ERROR"
    AUDIO_SAMPLE_RATE_UNSUPPORTED = "AUDIO_SAMPLE_RATE_UNSUPPORTED"
    AUDIO_TOO_SHORT = "AUDIO_TOO_SHORT"
    AUDIO_TOO_LONG = "AUDIO_TOO_LONG"
    TOO_MANY_MEDIA = "TOO_MANY_MEDIA"
    PROMPT_TOO_LONG = "PROMPT_TOO_LONG"
    INVALID_SAMPLING = "INVALID_SAMPLING"
    PREPROCESS_ERROR = "PREPROCESS_ERROR"
    ENGINE_ERROR = "ENGINE_ERROR"
    ENGINE_CRASH_QUARANTINED = "ENGINE_CRASH_QUARANTINED"
    MEDIA_PATH_REFUSED = "MEDIA_PATH_REFUSED"  # outside the trust boundary, or not a regular file
    MEDIA_TOO_LARGE = "MEDIA_TOO_LARGE"  # encoded bytes over media.max_media_bytes
    AUDIO_TOO_LARGE = "AUDIO_TOO_LARGE"  # decoded frames x channels over media.max_audio_samples
    PREPROCESS_TIMEOUT = "PREPROCESS_TIMEOUT"  # the CPU stage gave up on the row (media.preprocess_timeout_s)
    MEDIA_ACCESS_DENIED = "MEDIA_ACCESS_DENIED"  # the store refused the job's credentials (401/403)
    MEDIA_FETCH_TIMEOUT = "MEDIA_FETCH_TIMEOUT"  # every attempt timed out (media.remote_timeout_s)
    MEDIA_FETCH_FAILED = "MEDIA_FETCH_FAILED"  # throttled, 5xx or reset on every attempt; another HTTP error
    INVALID_STRUCTURED = "INVALID_STRUCTURED"  # the row's input.columns.structured cell is not a valid spec
    OUTPUT_TRUNCATED = "OUTPUT_TRUNCATED"  # a structured answer cut off by max_tokens (raw text kept)
    OUTPUT_INVALID = "OUTPUT_INVALID"  # a structured answer that fails its check (raw text kept)
    TASKS_FAILED = (
        "TASKS_FAILED"  # tasks: one or more of the row's tasks failed (each task's struct says why)
    )


class RowError(Exception):
    """A row-level failure with a stable code. Raised by stage internals, turned into an error row. Its
    message is redacted (``schemas.redact``): a presigned URL's signature never reaches an output row."""

    def __init__(self, code: ErrorCode, message: str):
        message = redact(message)
        super().__init__(f"{code.value}: {message}")
        self.code = code
        self.message = message


# Media as Hugging Face datasets stores it (datasets.Image / datasets.Audio).
MEDIA_STRUCT = pa.struct([("bytes", pa.binary()), ("path", pa.string())])

# One image as the CPU stage hands it to the GPU stage (see actors.media.features): the picture resized into its
# grid of 448 px crops and padded, uint8 (height, width, 3) row-major; the crops' 32x32 patch masks, uint8
# (1 + crops, 32, 32); the placeholder tokens it takes; the engine's cache key for it.
PREPARED_IMAGE = pa.struct(
    [
        ("canvas", pa.large_binary()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("mask", pa.binary()),
        ("tokens", pa.int32()),
        ("uuid", pa.string()),
    ]
)
# One audio clip (or window): log-mel features, float32 little-endian (frames, 80), its cache key, and
# whether its row has images (the model then projects it with its vision-speech projection).
PREPARED_AUDIO = pa.struct(
    [
        ("features", pa.large_binary()),
        ("frames", pa.int32()),
        ("uuid", pa.string()),
        ("with_images", pa.bool_()),
    ]
)

_ARROW_TYPES = {
    "int32": pa.int32(),
    "int64": pa.int64(),
    "float32": pa.float32(),
    "list<string>": pa.list_(pa.string()),
}
# Per-row sampling overrides (schemas.sampling.RowSampling); null means "use the job's default".
SAMPLING_FIELDS: list[pa.Field] = [
    pa.field(name, _ARROW_TYPES[field.json_schema_extra["arrow"]])
    for name, field in RowSampling.model_fields.items()
]

STATUS_FIELDS: list[pa.Field] = [
    pa.field("id", pa.string()),
    pa.field("status", pa.string(), nullable=False),
    pa.field("error_code", pa.string()),
    pa.field("error_message", pa.string()),
]

# What the CPU stage emits and the GPU stage consumes. Internal: may change between releases.
PREPARED_SCHEMA = pa.schema(
    STATUS_FIELDS
    + [
        pa.field("prompt", pa.string()),
        pa.field("images", pa.list_(PREPARED_IMAGE)),
        pa.field("audios", pa.list_(PREPARED_AUDIO)),
        pa.field("adapter", pa.string()),
        pa.field("prompt_tokens", pa.int32()),
        pa.field("num_images", pa.int16()),
        pa.field("num_audios", pa.int16()),
        pa.field("audio_seconds", pa.float32()),
        # > 0: `audios` holds this many overlapping windows of one clip, each its own request
        pa.field("audio_chunks", pa.int16()),
        pa.field("media_adjustments", pa.string()),
        pa.field("structured", pa.string()),  # the row's StructuredSpec.to_json() (schemas.annotation)
        pa.field("tasks", pa.list_(PREPARED_TASK)),  # tasks: each task's prompt and count, or its error
    ]
    + SAMPLING_FIELDS
    + [pa.field("preprocess_s", pa.float32())]
)

# One choice's probability (confidence with structured.choice).

# The public output contract. Changes are recorded in CHANGELOG.md.
OUTPUT_SCHEMA = pa.schema(
    STATUS_FIELDS
    + [
        pa.field("text", pa.string()),
        pa.field("prompt_tokens", pa.int32()),
        pa.field("completion_tokens", pa.int32()),
        pa.field("finish_reason", pa.string()),
        pa.field("adapter", pa.string()),
        pa.field("model", pa.string()),
        pa.field("num_images", pa.int16()),
        pa.field("num_audios", pa.int16()),
        pa.field("audio_seconds", pa.float32()),
        pa.field("audio_chunks", pa.int16()),
        pa.field("media_adjustments", pa.string()),
        pa.field("preprocess_s", pa.float32()),
        pa.field("queue_s", pa.float32()),
        pa.field("engine_s", pa.float32()),
        pa.field("run_id", pa.string()),
        pa.field("logprob_mean", pa.float32()),
        pa.field("logprob_min", pa.float32()),
        pa.field("choice_probs", pa.list_(CHOICE_PROB)),
    ],
    metadata={"phi4mm_batch.output_schema_version": "4"},
)

# One task's answer for one row (schemas.multitask): the output's own status and engine fields, by name, so
# a task's struct and the row's columns cannot drift apart (all nullable inside the struct, as in
# schema version 4); and its samples when n > 1.
TASK_RESULT = pa.struct(
    [
        OUTPUT_SCHEMA.field(name).with_nullable(True)
        for name in ("status", "error_code", "error_message", "text", "finish_reason", "prompt_tokens",
                     "completion_tokens", "logprob_mean", "logprob_min", "choice_probs")
    ]
    + [pa.field("samples", pa.list_(pa.string()))]
)  # fmt: skip

OUTPUT_COLUMN_DOCS: dict[str, str] = {
    "id": "The input row's id, copied verbatim.",
    "status": "'ok' (text is the model's answer) or 'error' (error_code/error_message say why). "
    "With tasks: 'ok' when every task is, else TASKS_FAILED (each task's struct column says why).",
    "error_code": "Stable code of the failure (schemas.rows.ErrorCode); null when ok.",
    "error_message": "What was wrong with the row and what to do about it; null when ok.",
    "text": "Generated text; null for error rows but OUTPUT_TRUNCATED / OUTPUT_INVALID (the raw answer), "
    "and with tasks (each task's struct column holds its text).",
    "prompt_tokens": "Prompt length in tokens, text plus image/audio placeholders, as vLLM counted it; with tasks "
    "the sum over the row's tasks.",
    "completion_tokens": "Generated tokens (with tasks: the sum over the row's tasks and samples).",
    "finish_reason": "'stop' (end token or stop string), 'length' (hit max_tokens) or 'repetition' (a loop, stopped).",
    "adapter": "LoRA adapter the row ran with: 'vision', 'speech' or null (text rows).",
    "model": "Model path or name the row ran on.",
    "num_images": "Images in the row.",
    "num_audios": "Audio clips in the row.",
    "audio_seconds": "Total audio duration in seconds.",
    "audio_chunks": "Windows a long clip was split into and transcribed as (media.long_audio: chunk); null otherwise.",
    "media_adjustments": "What the CPU stage changed to make the row fit, e.g. an image downscaled; null if nothing.",
    "preprocess_s": "CPU time spent decoding and preparing this row.",
    "queue_s": "Seconds the row's request waited in the GPU actor before the engine admitted it.",
    "engine_s": "Seconds from submitting the row's request to its completion (queue_s included).",
    "run_id": "Id of the run that wrote the row (one per jobs.run invocation).",
    "logprob_mean": "confidence: mean log-probability of the answer's tokens; null otherwise.",
    "logprob_min": "confidence: lowest log-probability among the answer's tokens; null otherwise.",
    "choice_probs": "confidence with structured.choice: [{choice, prob}] per choice, in the config's order.",
}


def empty_prepared_row(row_id: str | None) -> dict:
    return {f.name: None for f in PREPARED_SCHEMA} | {"id": row_id, "status": Status.OK.value}


def output_row_from_prepared(prepared: dict, model: str, run_id: str) -> dict:
    """Start an output row from a prepared row; fields only the engine knows stay null."""
    row = {f.name: prepared.get(f.name) for f in OUTPUT_SCHEMA}
    row.update(model=model, run_id=run_id)
    return row
