"""The contract between the GPU stage and an engine: one row's request, its result, and the engine.

The CPU stage validates a row's sampling with ``RowSampling`` (bounds in ``schemas.sampling``, nowhere
else) and hands the GPU stage a prepared row (``schemas.rows.PREPARED_SCHEMA``); the GPU stage turns it
into ``EngineRequest``s (``from_prepared``: one per request, so one per window of a chunked clip), an
``Engine`` answers each with an ``EngineResult``, in order, and maps the request to its own parameters
(``effective_sampling`` merges the row's overrides into the job's defaults for every engine alike).

Cheap to import: no torch, vLLM or Ray.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from pydantic import BaseModel, ConfigDict, Field

from schemas.annotation import StructuredSpec, parse_spec
from schemas.job import JobConfig, SamplingConfig
from schemas.model import PHI4MM, Adapter
from schemas.sampling import RowSampling


class EngineRequest(BaseModel):
    """One request to an engine: a prompt with its media placeholders, the prepared media, the adapter and
    the row's sampling overrides."""

    model_config = ConfigDict(extra="forbid", frozen=True, arbitrary_types_allowed=True)

    prompt: str = Field(
        description="The whole prompt text, media tags included (<|image_1|>, <|audio_1|>; actors.prompt)."
    )
    images: list[dict[str, Any]] = Field(
        default_factory=list,
        description="Prepared images, schemas.rows.PREPARED_IMAGE values (the canvas may be a pyarrow.Buffer).",
    )
    audios: list[dict[str, Any]] = Field(
        default_factory=list,
        description="Prepared clips, schemas.rows.PREPARED_AUDIO values (the features may be a pyarrow.Buffer).",
    )
    adapter: Adapter | None = Field(
        None, description="LoRA adapter to run with (schemas.model.PHI4MM.adapter_for); None: the base model."
    )
    sampling: RowSampling = Field(
        default_factory=RowSampling, description="The row's overrides of the job's sampling."
    )
    prompt_tokens: int | None = Field(
        None, description="The CPU stage's count of this request's prompt tokens, when it made one."
    )
    alone: bool = Field(
        False, description="Run with nothing else in the engine (the row is suspected of crashing it)."
    )
    structured: StructuredSpec | None = Field(
        None, description="What the answer must be (schemas.annotation); None: free text."
    )

    @classmethod
    def from_prepared(cls, row: dict, alone: bool = False) -> list[EngineRequest]:
        """A prepared row's requests: one, or one per window of a chunked audio clip. The row was validated
        by the CPU stage and typed by the prepared schema, so it is not validated again here."""
        sampling = RowSampling.model_construct(**{name: row[name] for name in RowSampling.model_fields})
        fields = dict(
            prompt=row["prompt"],
            images=row["images"] or [],
            adapter=row["adapter"],
            sampling=sampling,
            alone=alone,
            structured=parse_spec(row["structured"]) if row.get("structured") else None,
        )
        audios = row["audios"] or []
        if not row["audio_chunks"]:
            return [cls.model_construct(**fields, audios=audios, prompt_tokens=row["prompt_tokens"])]
        return [cls.model_construct(**fields, audios=[window], prompt_tokens=None) for window in audios]


class EngineResult(BaseModel):
    """An engine's answer to one request: the text and its token counts, or an error."""

    model_config = ConfigDict(extra="forbid")

    text: str | None = Field(None, description="Generated text.")
    prompt_tokens: int | None = Field(None, description="Prompt tokens as the engine counted them.")
    completion_tokens: int | None = Field(None, description="Generated tokens.")
    finish_reason: str | None = Field(
        None,
        description="'stop' (end token or stop string), 'length' (max_tokens reached) or 'repetition'.",
    )
    error: str | None = Field(
        None, description="Why the engine rejected or failed this one request; None when it succeeded."
    )
    queued_s: float | None = Field(None, description="Seconds from submission to admission into the engine.")
    engine_s: float | None = Field(None, description="Seconds from submission to completion.")
    logprob_mean: float | None = Field(None, description="confidence: mean log-probability of the tokens.")
    logprob_min: float | None = Field(None, description="confidence: lowest token log-probability.")
    choice_probs: list[float] | None = Field(
        None, description="confidence with a choice list: each choice's probability, in the list's order."
    )


def effective_sampling(defaults: SamplingConfig, row: RowSampling) -> SamplingConfig:
    """The job's sampling with the row's non-null overrides applied: what every engine generates with."""
    overrides = {name: value for name, value in row if value is not None}
    return defaults.model_copy(update=overrides) if overrides else defaults


class Engine(Protocol):
    """What the GPU stage needs of an engine. ``generate`` is thread-safe, returns one ``EngineResult`` per
    request, in order, and never raises because of one bad request (a dead engine may end the process)."""

    def generate(self, requests: list[EngineRequest]) -> list[EngineResult]: ...

    def stats(self) -> dict[str, Any]:
        """Figures for the run summary's ``engines``: at least startup_s, ready_at, requests, busy_s."""
        ...


def warm_up(engine: Engine) -> None:
    """One short request before an engine takes rows, so the first batch does not pay for lazy setup."""
    warm = EngineRequest(
        prompt=f"{PHI4MM.user_tag}hello{PHI4MM.end_tag}{PHI4MM.assistant_tag}",
        sampling=RowSampling(max_tokens=1),
    )
    (result,) = engine.generate([warm])
    if result.error:
        raise RuntimeError(f"engine warm-up failed: {result.error}")


# Builds a job's engine in the GPU actor: ``actors.engines.build_engine``, or a stand-in in unit tests.
EngineFactory = Callable[[JobConfig], Engine]
