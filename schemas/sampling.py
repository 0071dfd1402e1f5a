"""Sampling: the fields a row may override, their bounds and their Arrow types, stated once.

``RowSampling`` is the per-row part of an engine request (``actors.engines.contract``): the CPU stage
validates a row's sampling columns with it, the prepared and output schemas take their sampling columns
from it (``schemas.rows.SAMPLING_FIELDS``), the columns config names one input column per field
(``schemas.job.ColumnsConfig``), and the job's defaults (``schemas.job.SamplingConfig``) use the same
bounded types. Nothing here imports torch, vLLM or Ray.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StringConstraints

INT32_MAX = 2**31 - 1
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
MAX_STOP_STRINGS = 16


def _one_or_many(value):
    """A single stop string counts as a list of one."""
    return [value] if isinstance(value, str) else value


MaxTokens = Annotated[int, Field(ge=1, le=INT32_MAX)]
MAX_TEMPERATURE = 100.0  # far past where sampling is already uniform noise
Temperature = Annotated[float, Field(ge=0, le=MAX_TEMPERATURE)]
TopP = Annotated[float, Field(gt=0, le=1)]
Seed = Annotated[int, Field(ge=INT64_MIN, le=INT64_MAX)]
StopStrings = Annotated[
    list[Annotated[str, StringConstraints(min_length=1)]],
    BeforeValidator(_one_or_many),
    Field(max_length=MAX_STOP_STRINGS),
]


def _arrow(type_name: str) -> dict:
    return {"arrow": type_name}  # the column's Arrow type in prepared and output rows (schemas.rows)


class RowSampling(BaseModel):
    """One row's sampling overrides; a field left null takes the job's ``sampling`` value."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_tokens: MaxTokens | None = Field(
        None, description="Completion budget in tokens.", json_schema_extra=_arrow("int32")
    )
    temperature: Temperature | None = Field(
        None, description="Sampling temperature; 0 is greedy.", json_schema_extra=_arrow("float32")
    )
    top_p: TopP | None = Field(
        None, description="Nucleus sampling mass, in (0, 1].", json_schema_extra=_arrow("float32")
    )
    seed: Seed | None = Field(
        None,
        description="Sampling seed for reproducible non-greedy answers.",
        json_schema_extra=_arrow("int64"),
    )
    stop: StopStrings | None = Field(
        None,
        min_length=1,
        description=f"Stop strings: one, or a list of 1-{MAX_STOP_STRINGS} non-empty strings.",
        json_schema_extra=_arrow("list<string>"),
    )
