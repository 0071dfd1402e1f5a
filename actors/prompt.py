"""Phi-4-multimodal prompts: ``<|user|><|image_1|>…<|audio_1|>…instruction<|end|><|assistant|>``.

User text is sanitised first: anything shaped like a special token (``<|image_1|>``, ``<|end|>``) is
defused, so a prompt cannot add, shift or steal media placeholders or close its own turn.
"""

from __future__ import annotations

import functools
import re

from schemas.job import PromptConfig
from schemas.model import PHI4MM, Modality
from schemas.rows import ErrorCode, RowError
from schemas.task import TaskConfig

_SPECIAL_LIKE = re.compile(r"<\|([^<>|]{0,64})\|>")


def sanitize(text: str) -> str:
    """Defuse special-token-shaped text: ``<|image_1|>`` becomes ``<image_1>``, which tokenises as plain text."""
    return _SPECIAL_LIKE.sub(lambda m: f"<{m.group(1)}>", text)


def modality_of(num_images: int, num_audios: int) -> Modality:
    if num_images and num_audios:
        return "image_audio"
    if num_images:
        return "image"
    if num_audios:
        return "audio"
    return "text"


def instruction_for(user_text: str | None, modality: Modality, defaults: PromptConfig) -> str:
    """The row's own text, or the configured default for its modality when it has none."""
    if user_text is not None and user_text.strip():
        return sanitize(user_text)
    return getattr(defaults, f"default_{modality}")


def task_instruction(task: TaskConfig, row: dict) -> str:
    """The task's instruction for a row: its template's ``{column}`` cells, defused, filled in. A null or
    blank cell is the row's MISSING_INPUT, a cell that is not text or a number its INVALID_INPUT."""
    cells = {}
    for name in task.row_columns:
        value = row.get(name)
        if value is None or (isinstance(value, str) and not value.strip()):
            raise RowError(
                ErrorCode.MISSING_INPUT,
                f"column {name!r} is empty, and the {task.preset} task's instruction is made from it. "
                "Try filling it in for this row.",
            )
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise RowError(
                ErrorCode.INVALID_INPUT,
                f"column {name!r} holds {type(value).__name__}, not text, and the {task.preset} task's "
                "instruction is made from it. Try a string column.",
            )
        cells[name] = sanitize(str(value))
    return task.instruction(cells)


def build_prompt(instruction: str, num_images: int, num_audios: int, system: str | None = None) -> str:
    """The full prompt string; media tags come first, numbered from 1, images before audio."""
    media = "".join(PHI4MM.image_tag(i + 1) for i in range(num_images))
    media += "".join(PHI4MM.audio_tag(i + 1) for i in range(num_audios))
    head = f"{PHI4MM.system_tag}{sanitize(system)}{PHI4MM.end_tag}" if system else ""
    return f"{head}{PHI4MM.user_tag}{media}{instruction}{PHI4MM.end_tag}{PHI4MM.assistant_tag}"


class PromptTokenCounter:
    """Counts prompt tokens the way vLLM will: tokenised text, each media tag replaced by its expansion."""

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer
        self._tag_lengths: dict[str, int] = {}
        # Many rows share a prompt (the per-modality defaults), and a chunked row counts one per window.
        self._text_length = functools.lru_cache(maxsize=4096)(
            lambda prompt: len(tokenizer.encode(prompt, add_special_tokens=True))
        )

    def _tag_length(self, tag: str) -> int:
        if tag not in self._tag_lengths:
            self._tag_lengths[tag] = len(self._tokenizer.encode(tag, add_special_tokens=False))
        return self._tag_lengths[tag]

    def count(self, prompt: str, image_tokens: list[int], audio_tokens: list[int]) -> int:
        total = self._text_length(prompt)
        for i, n in enumerate(image_tokens):
            total += n - self._tag_length(PHI4MM.image_tag(i + 1))
        for i, n in enumerate(audio_tokens):
            total += n - self._tag_length(PHI4MM.audio_tag(i + 1))
        return total
