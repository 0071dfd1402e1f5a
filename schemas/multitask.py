"""Several tasks per row in one pass: the config's ``tasks`` section, and each task's output struct.

    tasks:
      transcript: {preset: transcribe}
      french: {preset: translate, target_language: French, max_tokens: 128, n: 2}

A row's media are decoded and prepared once; each task is its own request (or ``n`` requests) to the engine,
with the same media tags first in every prompt so the engine's prefix and encoder caches serve the row's
other tasks. The output keeps one row per input row and adds one struct column per task (``schemas.rows.TASK_RESULT``,
named after the task). Nothing here imports torch, vllm or ray.
"""

from __future__ import annotations

import re

import pyarrow as pa
from pydantic import Field

from schemas.annotation import StructuredSpec
from schemas.sampling import MaxTokens
from schemas.task import TaskConfig

MAX_TASKS = 16
MAX_SAMPLES = 16
TASK_PREFIX = "task:"  # a task's column between the GPU stage and the writer: no clash with other columns
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")


class TaskSpec(TaskConfig):
    """One task of ``tasks``: the fields of the ``task`` section plus its own answer settings."""

    structured: StructuredSpec | None = Field(
        None, description="Constrain this task's answers to a JSON schema, a choice list or a regex."
    )
    max_tokens: MaxTokens | None = Field(
        None, description="This task's completion budget (a row's max_tokens column still overrides it)."
    )
    n: int = Field(
        1,
        ge=1,
        le=MAX_SAMPLES,
        description=(
            "Samples per row: n requests (seeds seed, seed+1, ... when a seed is set); the first is the "
            "task's text, all are in samples. Needs temperature > 0 to differ."
        ),
    )


# A choice's probability: the output's choice_probs items, a row's (schemas.rows) as a task's.
CHOICE_PROB = pa.struct([("choice", pa.string()), ("prob", pa.float32())])

# A prepared row's task: its prompt and token count, or the error that keeps it from running.
PREPARED_TASK = pa.struct(
    [
        pa.field("name", pa.string()),
        pa.field("prompt", pa.string()),
        pa.field("prompt_tokens", pa.int32()),
        pa.field("error_code", pa.string()),
        pa.field("error_message", pa.string()),
    ]
)


def check_tasks(config) -> None:
    """The job's ``tasks`` against the rest of its config (a ``JobConfig``); ValueError with a "Try"."""
    tasks = config.tasks
    if tasks is None:
        return
    if config.task is not None:
        raise ValueError("task and tasks are both set. Try one: tasks: {name: {preset: ...}} holds several.")
    if not tasks or len(tasks) > MAX_TASKS:
        raise ValueError(f"tasks holds {len(tasks)} tasks. Try 1 to {MAX_TASKS}.")
    if config.structured is not None or config.input.columns.structured is not None:
        raise ValueError("structured (job or row column) applies to one task. Try tasks.NAME.structured.")
    if config.media.long_audio == "chunk":
        raise ValueError("tasks cannot run on a long clip's windows (media.long_audio: chunk). Try single.")
    from schemas.rows import OUTPUT_SCHEMA

    taken = {config.output.column_names.get(n, n) for n in OUTPUT_SCHEMA.names}
    taken |= set(config.output.carry_columns)
    for name in tasks:
        if not _NAME.fullmatch(name):
            raise ValueError(f"tasks.{name}: a task's name is its output column. Try letters, digits and _.")
        if name in taken:
            raise ValueError(f"tasks.{name} is already an output column. Try another name, e.g. {name}_task.")
        budget = tasks[name].max_tokens or 0
        if budget >= config.engine.max_model_len:
            raise ValueError(
                f"tasks.{name}.max_tokens ({budget}) leaves no room for the prompt in engine.max_model_len "
                f"({config.engine.max_model_len}). Try a lower max_tokens."
            )
