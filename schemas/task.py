"""Task presets: what a job asks of every row, as the config's ``task`` section.

    task: {preset: translate, target_language: French}

A preset is an instruction template and the media it reads. The instruction goes where a row's prompt
would (``actors.prompt.build_prompt`` wraps it in the Phi-4-mm format of ``schemas.model``); ``{name}``
placeholders are filled from the row's input column ``name`` (untrusted text: the filled instruction is
defused as a whole, like any prompt), ``{target_language}`` from this section. Nothing here imports
torch, vllm or ray.
"""

from __future__ import annotations

import string
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

Preset = Literal["caption", "transcribe", "translate", "summarize_audio", "vqa", "ocr", "custom"]
Reads = Literal["image", "audio", "any"]

# preset -> (the media it reads, its instruction template). ``{question}`` is task.question_column's cell.
PRESETS: dict[str, tuple[Reads, str]] = {
    "caption": ("image", "Write a one-sentence caption for this image."),
    "transcribe": ("audio", "Transcribe the audio to text."),
    "translate": ("audio", "Translate the audio to {target_language}."),
    "summarize_audio": ("audio", "Summarize the audio in a few sentences."),
    "vqa": ("image", "{question}"),
    "ocr": ("image", "Extract all the text in this image, exactly as written, line by line."),
    "custom": ("any", ""),
}
CONFIG_FIELDS = ("target_language",)  # placeholders filled from this section, not from a row


def placeholders(template: str) -> list[str]:
    """The ``{name}`` fields of a template, in order; ValueError (with a "Try") for anything else."""
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as e:
        raise ValueError(f"template {template!r}: {e}. Try '{{{{' and '}}}}' for literal braces.") from None
    names = []
    for _, name, spec, conversion in parsed:
        if name is None:
            continue
        if not name or any(c in name for c in ".[]") or spec or conversion:
            raise ValueError(
                f"template {template!r} has the placeholder {{{name}{'!' + conversion if conversion else ''}"
                f"{':' + spec if spec else ''}}}: only plain {{column}} names are filled. Try {{column_name}}."
            )
        names.append(name)
    return names


def fill(template: str, values: dict[str, str]) -> str:
    """The template with each placeholder replaced by ``values[name]`` (no attribute or index lookups:
    ``str.format`` would follow ``{x.y}``); ``{{``/``}}`` become literal braces."""
    return "".join(
        literal + ("" if name is None else values[name])
        for literal, name, _, _ in string.Formatter().parse(template)
    )


class TaskConfig(BaseModel):
    """One of the presets, or a custom template; ``prompt.system`` still applies."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    preset: Preset = Field(
        description=(
            "caption / ocr / vqa read the image column; transcribe / translate / summarize_audio the audio "
            "column; custom reads both and fills its template. A row without the media its task reads is "
            "a MISSING_INPUT error row. The input's prompt column and prompt.default_* are not used."
        )
    )
    target_language: str | None = Field(
        None, description="translate: the language to translate into (e.g. French). Required there."
    )
    question_column: str = Field(
        "question", description="vqa: the input column holding each row's question about its image."
    )
    template: str | None = Field(
        None,
        description=(
            "custom (required there), or any preset's instruction reworded: {column} placeholders are "
            "filled from the row's input columns ({target_language} from this section); a null or empty "
            "cell makes the row MISSING_INPUT. Write {{ and }} for literal braces."
        ),
    )

    @model_validator(mode="after")
    def _check(self) -> TaskConfig:
        if self.preset == "custom" and not (self.template and self.template.strip()):
            raise ValueError("task.preset custom needs task.template. Try template: 'Describe {column}.'")
        if self.preset == "translate" and not (self.target_language and self.target_language.strip()):
            raise ValueError("task.preset translate needs task.target_language. Try target_language: French.")
        if "target_language" in self.row_columns:
            raise ValueError(
                "task.template uses {target_language} but task.target_language is not set. Try setting it."
            )
        return self

    @property
    def reads(self) -> Reads:
        return PRESETS[self.preset][0]

    @property
    def instruction_template(self) -> str:
        """The template filled for every row (``{question}`` renamed to task.question_column)."""
        if self.template:
            return self.template
        return PRESETS[self.preset][1].replace("{question}", "{" + self.question_column + "}")

    def instruction(self, cells: dict[str, str]) -> str:
        """The instruction for a row whose template columns hold ``cells`` (text; ``build_prompt`` defuses the
        whole)."""
        return fill(self.instruction_template, {"target_language": self.target_language or "", **cells})

    @property
    def row_columns(self) -> list[str]:
        """Input columns the template reads, in order, each once (``{target_language}`` is not one when
        the section sets it)."""
        given = {name for name in CONFIG_FIELDS if getattr(self, name)}
        return list(dict.fromkeys(n for n in placeholders(self.instruction_template) if n not in given))
