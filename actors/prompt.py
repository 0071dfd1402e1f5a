"""Phi-4-multimodal prompts: ``<|user|><|image_1|>…<|audio_1|>…instruction<|end|><|assistant|>``.

The instruction (a row's prompt, or a task's template with the row's cells filled in) is defused as a
whole, after it is assembled: any ``<|…|>`` (``<|image_1|>``, ``<|end|>``) and any other special token of
the tokenizer it spells, even split over two cells, becomes plain text. Then ``PromptTokenCounter.check``
makes sure, on the token ids, that the prompt holds exactly the special tokens the code put there (its
turns and one placeholder per media item), so a row cannot add, shift or steal media placeholders or close
its own turn.
"""

from __future__ import annotations

import functools
import re
from collections import Counter

from schemas.job import PromptConfig
from schemas.model import PHI4MM, Modality
from schemas.rows import ErrorCode, RowError
from schemas.task import TaskConfig

_SPECIAL_LIKE = re.compile(r"<\|([^<>|]{0,64})\|>")
_SPLIT = "\u200b"  # a zero-width space: the text reads the same, the tokenizer no longer sees the token


@functools.lru_cache(maxsize=8)
def _other_specials(specials: tuple[str, ...]) -> re.Pattern | None:
    """One pattern for the special tokens not shaped ``<|…|>`` (those are defused anyway), longest first."""
    others = sorted(
        {t for t in specials if len(t) > 1 and not _SPECIAL_LIKE.fullmatch(t)}, key=len, reverse=True
    )
    return re.compile("|".join(map(re.escape, others))) if others else None


def sanitize(text: str, specials: tuple[str, ...] = ()) -> str:
    """Defuse special-token text: ``<|image_1|>`` becomes ``<image_1>``, and any other of ``specials`` (the
    tokenizer's) gets a zero-width space after its first character; both tokenise as plain text. Repeated
    while defusing one token joins its neighbours into another; what still slips through, ``check`` refuses."""
    others = _other_specials(specials)
    for _ in range(8):
        clean = _SPECIAL_LIKE.sub(lambda m: f"<{m.group(1)}>", text)
        clean = others.sub(lambda m: m[0][0] + _SPLIT + m[0][1:], clean) if others else clean
        if clean == text:
            break
        text = clean
    return text


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
        return user_text
    return getattr(defaults, f"default_{modality}")


def task_instruction(task: TaskConfig, row: dict) -> str:
    """The task's instruction for a row: its template's ``{column}`` cells filled in (``build_prompt``
    defuses the whole). A null or blank cell is the row's MISSING_INPUT, a cell that is not text or a number
    its INVALID_INPUT."""
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
        cells[name] = str(value)
    return task.instruction(cells)


def build_prompt(
    instruction: str,
    num_images: int,
    num_audios: int,
    system: str | None = None,
    specials: tuple[str, ...] = (),
) -> str:
    """The full prompt string; media tags come first, numbered from 1, images before audio. The instruction
    and system text are defused (``sanitize``, with the tokenizer's ``specials``) as assembled."""
    media = "".join(PHI4MM.image_tag(i + 1) for i in range(num_images))
    media += "".join(PHI4MM.audio_tag(i + 1) for i in range(num_audios))
    head = f"{PHI4MM.system_tag}{sanitize(system, specials)}{PHI4MM.end_tag}" if system else ""
    user = sanitize(instruction, specials)
    return f"{head}{PHI4MM.user_tag}{media}{user}{PHI4MM.end_tag}{PHI4MM.assistant_tag}"


class PromptTokenCounter:
    """Counts prompt tokens the way vLLM will: tokenised text, each media tag replaced by its expansion; and
    checks that a prompt's special tokens are the ones the code put there."""

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer
        self._tag_lengths: dict[str, int] = {}
        added = {i: str(t) for i, t in tokenizer.added_tokens_decoder.items() if t.special}
        # every special token of the tokenizer, as text: what ``build_prompt`` defuses
        self.special_tokens = tuple(dict.fromkeys([*tokenizer.all_special_tokens, *added.values()]))
        # the ids ``check`` compares; unknown text tokenises to the unknown token (the tiny model's
        # <|endoftext|>), so text may hold that one
        ids = {*tokenizer.all_special_ids, *added, PHI4MM.image_token_id, PHI4MM.audio_token_id}
        self._special_ids = ids - {tokenizer.unk_token_id}
        # Many rows share a prompt (the per-modality defaults), and a chunked row counts one per window.
        self._encoded = functools.lru_cache(maxsize=4096)(self._encode)

    def _encode(self, prompt: str) -> tuple[int, tuple[int, ...]]:
        """(token count, the special token ids in order) of a prompt's text."""
        ids = self._tokenizer.encode(prompt, add_special_tokens=True)
        return len(ids), tuple(i for i in ids if i in self._special_ids)

    def _tag_length(self, tag: str) -> int:
        if tag not in self._tag_lengths:
            self._tag_lengths[tag] = len(self._tokenizer.encode(tag, add_special_tokens=False))
        return self._tag_lengths[tag]

    def count(self, prompt: str, image_tokens: list[int], audio_tokens: list[int]) -> int:
        total = self._encoded(prompt)[0]
        for i, n in enumerate(image_tokens):
            total += n - self._tag_length(PHI4MM.image_tag(i + 1))
        for i, n in enumerate(audio_tokens):
            total += n - self._tag_length(PHI4MM.audio_tag(i + 1))
        return total

    def check(self, prompt: str, skeleton: str) -> None:
        """The row's INVALID_INPUT unless the prompt's special token ids are exactly those of ``skeleton``,
        the same prompt with an empty instruction: its turns and, where the tokenizer holds media tags as
        special tokens (the tiny model's), one placeholder per media item. Any ``<|…|>`` text is defused
        before, special token of the tokenizer or not."""
        got, want = self._encoded(prompt)[1], self._encoded(skeleton)[1]
        if got == want:
            return
        odd = (Counter(got) - Counter(want)) + (Counter(want) - Counter(got)) or Counter(got)
        names = ", ".join(self._tokenizer.convert_ids_to_tokens(sorted(odd)))
        raise RowError(
            ErrorCode.INVALID_INPUT,
            f"the prompt made from the row's text has special tokens ({names}) other than its turns and "
            "media placeholders, even defused: they would add, move or steal a placeholder or end its turn. "
            "Try removing that text from the row.",
        )
