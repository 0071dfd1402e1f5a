"""Annotation: constrained answers (``structured``), a stop for looping output (``repetition``) and
per-row scores (``confidence``), as the job config's sections of those names.

    structured: {choice: [positive, negative, neutral]}
    structured: {json_schema: {type: object, properties: {label: {type: string}}, required: [label]}}
    structured: {regex: '\\d{4}-\\d{2}-\\d{2}'}

The engine constrains decoding to what is asked; every ok row's answer is then checked against it
(``actors.output_check``), so an answer cut off or off the mark is an error row (OUTPUT_TRUNCATED,
OUTPUT_INVALID) with its raw text kept. A row may ask its own through the input column
``input.columns.structured`` (a JSON object of the same shape; a bad cell is an INVALID_STRUCTURED row).
A job-level JSON schema also gives the output a typed column (``json_arrow``: Arrow types derived from
the schema). Imports jsonschema, never torch, vLLM or Ray.
"""

from __future__ import annotations

import functools
import json
import re
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

CHOICE_LOGPROBS = 20  # top tokens asked per answer position for choice probabilities (vLLM's max)
STRUCTURED_CELL_CHARS = 65_536  # the most a row's structured cell may hold (rows are untrusted)
# Keywords whose values map names to subschemas, and keywords whose values are data, not schemas.
_SCHEMA_MAPS = frozenset({"properties", "patternProperties", "$defs", "definitions", "dependentSchemas"})
_DATA = frozenset({"enum", "const", "default", "examples", "dependentRequired", "required", "$comment"})
_REF_ROOTS = ("/$defs/", "/definitions/")  # where a $ref may point: '#' or a schema under these


def schema_keywords(schema: Any):
    """Every ``(keyword, value)`` of a JSON schema and of all its subschemas (a property called "pattern"
    is a name, not the keyword). Deep nesting raises RecursionError."""
    if isinstance(schema, list):
        for item in schema:
            yield from schema_keywords(item)
    elif isinstance(schema, dict):
        for key, value in schema.items():
            yield key, value
            if key in _SCHEMA_MAPS and isinstance(value, dict):
                for sub in value.values():
                    yield from schema_keywords(sub)
            elif key not in _DATA:
                yield from schema_keywords(value)


def _local_schema(schema: dict, ref: Any) -> bool:
    """``ref`` is '#' or a JSON pointer into ``schema``'s $defs (or definitions) that reaches a schema (an
    object or a boolean) without passing through data (enum, const, ...), where ``schema_keywords`` looks."""
    if ref == "#":
        return True
    if not isinstance(ref, str) or not ref.startswith("#") or not ref[1:].startswith(_REF_ROOTS):
        return False
    node: Any = schema
    name = False  # the next part names an entry of a map of subschemas (any name, "enum" too)
    for part in ref[2:].split("/"):
        part = part.replace("~1", "/").replace("~0", "~")
        if not isinstance(node, dict) or part not in node or (part in _DATA and not name):
            return False
        name = part in _SCHEMA_MAPS and not name
        node = node[part]
    return isinstance(node, (dict, bool))


class StructuredSpec(BaseModel):
    """What a row's answer must be: exactly one of a JSON schema, a list of choices or a regex."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    json_schema: dict[str, Any] | None = Field(
        None, description="A JSON Schema (draft 2020-12) the answer, a JSON document, must validate against."
    )
    choice: list[str] | None = Field(
        None, min_length=1, description="The answer is exactly one of these strings (at least one, distinct)."
    )
    regex: str | None = Field(
        None, min_length=1, description="The whole answer matches this regular expression (Python syntax)."
    )

    @model_validator(mode="after")
    def _check(self) -> StructuredSpec:
        given = [k for k in ("json_schema", "choice", "regex") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(
                f"structured output needs exactly one of json_schema, choice, regex; got {given or 'none'}. "
                "Try one of them, e.g. {choice: [yes, no]}."
            )
        if self.json_schema is not None:
            from jsonschema import Draft202012Validator, SchemaError

            try:
                Draft202012Validator.check_schema(self.json_schema)
            except SchemaError as e:
                where = "/".join(str(p) for p in e.path) or "top"
                raise ValueError(
                    f"json_schema is not a valid JSON Schema ({where}: {e.message}). Try a schema that "
                    "jsonschema's Draft202012Validator.check_schema accepts."
                ) from None
            # answers are checked with no network: a $ref must point at a schema inside this one
            for key, value in schema_keywords(self.json_schema):
                if key in ("$ref", "$dynamicRef") and not _local_schema(self.json_schema, value):
                    raise ValueError(
                        f"json_schema {key} {value!r} does not point at a schema under $defs of this schema "
                        "(nothing is fetched). Try the referenced schema under $defs, referred to as "
                        "'#/$defs/NAME'."
                    )
        if self.choice is not None and (len(set(self.choice)) != len(self.choice) or "" in self.choice):
            raise ValueError("choice lists an empty or repeated string. Try distinct, non-empty choices.")
        if self.regex is not None:
            try:
                re.compile(self.regex)
            except re.error as e:
                raise ValueError(
                    f"regex {self.regex!r} does not compile ({e}). Try a valid pattern."
                ) from None
        return self

    @property
    def kind(self) -> str:
        return "json_schema" if self.json_schema is not None else "choice" if self.choice else "regex"

    def to_json(self) -> str:
        """The one-key form a prepared row carries (``from_json`` reads it back)."""
        return json.dumps({self.kind: getattr(self, self.kind)}, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> StructuredSpec:
        return cls.model_validate(json.loads(text))


class StructuredConfig(StructuredSpec):
    """The job's structured output; a row's ``input.columns.structured`` cell replaces it for that row."""

    typed_column: str | None = Field(
        "json",
        description=(
            "json_schema only: the output column holding each ok row's answer parsed into Arrow types derived "
            "from the schema (datasets reads it as nested features); null: none. Unsupported schema parts "
            "(anyOf, oneOf, open objects, mixed types) become JSON text."
        ),
    )


class RepetitionConfig(BaseModel):
    """Stops a row whose last tokens repeat one pattern: its finish_reason is 'repetition' (counted in the
    run summary). vLLM's RepetitionDetectionParams; the transformers backend applies the same rule."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = Field(
        True,
        description="Stop looping rows (on by default; off with sampling.ignore_eos, which benchmarks use).",
    )
    min_pattern_size: int = Field(
        1, ge=1, le=1024, description="Shortest repeated pattern, in tokens, that counts as a loop."
    )
    max_pattern_size: int = Field(
        64, ge=1, le=1024, description="Longest repeated pattern, in tokens, looked for."
    )
    min_count: int = Field(
        16,
        ge=2,
        le=2**31 - 1,
        description=(
            "Times a pattern must repeat back to back, at the end of the answer, to stop the row: the default "
            "spares lists and tables a few lines long while cutting real loops early."
        ),
    )

    @model_validator(mode="after")
    def _check(self) -> RepetitionConfig:
        if self.min_pattern_size > self.max_pattern_size:
            raise ValueError(
                f"repetition.min_pattern_size ({self.min_pattern_size}) is over max_pattern_size "
                f"({self.max_pattern_size}). Try a smaller min_pattern_size."
            )
        return self


def repetition_rule(config) -> RepetitionConfig | None:
    """The loop stop a job's engine applies (a ``JobConfig``): none when off, or with
    ``sampling.ignore_eos``, which asks for exactly max_tokens tokens (benchmarks)."""
    rule = config.repetition
    return rule if rule.enabled and not config.sampling.ignore_eos else None


def loops(tokens: list[int], rule: RepetitionConfig) -> bool:
    """Whether ``tokens`` end with a pattern of min..max_pattern_size tokens repeated min_count times back
    to back: vLLM's RepetitionDetectionParams rule, which the transformers backend applies itself."""
    n = len(tokens)
    for size in range(rule.min_pattern_size, rule.max_pattern_size + 1):
        if size * rule.min_count > n:
            break
        last = tokens[n - size :]
        if all(tokens[n - size * (m + 1) : n - size * m] == last for m in range(1, rule.min_count)):
            return True
    return False


def first_loop(tokens: list[int], rule: RepetitionConfig) -> int | None:
    """The length at which ``tokens`` first ``loops`` (where generation stops), or None."""
    start = rule.min_pattern_size * rule.min_count
    return next((k for k in range(start, len(tokens) + 1) if loops(tokens[:k], rule)), None)


def json_arrow(schema: dict):
    """The Arrow type of answers to a JSON schema (``JsonArrow``); local ``$ref``s are followed."""
    return JsonArrow(schema).type


class JsonArrow:
    """Answers to a JSON schema as Arrow values. object with properties -> struct (every property a
    nullable field; extra keys dropped), array with items -> list, string (or an enum/const of strings)
    -> string, integer -> int64, number -> float64, boolean -> bool, a type list of one type and "null"
    -> that type. Anything else (anyOf, oneOf, an object without properties, mixed types, recursive refs)
    -> JSON text in a string."""

    def __init__(self, schema: dict):
        import pyarrow as pa

        self.root = schema
        self.pa = pa
        self.type = self._type(schema, ())

    def _resolve(self, schema, seen: tuple):
        ref = schema.get("$ref") if isinstance(schema, dict) else None
        if ref is None:
            return schema, seen
        if ref in seen or not ref.startswith("#/"):
            return None, seen  # recursive or not local: JSON text
        node = self.root
        for part in ref[2:].split("/"):
            node = node.get(part) if isinstance(node, dict) else None
        return self._resolve(node, seen + (ref,)) if isinstance(node, dict) else (None, seen)

    def _kind(self, schema) -> str | None:
        if not isinstance(schema, dict):
            return None
        t = schema.get("type")
        if isinstance(t, list):
            t = [x for x in t if x != "null"]
            t = t[0] if len(t) == 1 else None
        values = schema.get("enum", [schema["const"]] if "const" in schema else None)
        if t is None and values and all(isinstance(v, str) for v in values):
            return "string"
        if any(k in schema for k in ("anyOf", "oneOf", "allOf", "not", "if")):
            return None
        if t == "object" and not schema.get("properties"):
            return None
        if t == "array" and not isinstance(schema.get("items"), dict):
            return None
        return t if t in ("object", "array", "string", "integer", "number", "boolean") else None

    def _type(self, schema, seen: tuple):
        pa = self.pa
        schema, seen = self._resolve(schema, seen)
        kind = self._kind(schema)
        if kind == "object":
            return pa.struct([(k, self._type(v, seen)) for k, v in schema["properties"].items()])
        if kind == "array":
            return pa.list_(self._type(schema["items"], seen))
        scalar = {"integer": pa.int64(), "number": pa.float64(), "boolean": pa.bool_()}
        return scalar.get(kind, pa.string())

    def value(self, value):
        """A JSON-parsed answer as the Python value ``self.type`` holds (None where it does not fit)."""
        return self._value(value, self.root, ())

    def _value(self, value, schema, seen: tuple):
        schema, seen = self._resolve(schema, seen)
        kind = self._kind(schema)
        if value is None:
            return None
        if kind == "object":
            if not isinstance(value, dict):
                return None
            return {k: self._value(value.get(k), v, seen) for k, v in schema["properties"].items()}
        if kind == "array":
            return [self._value(v, schema["items"], seen) for v in value] if isinstance(value, list) else None
        if kind == "integer":
            ok = isinstance(value, int) and not isinstance(value, bool) and -(2**63) <= value < 2**63
            return value if ok else None
        if kind == "number":
            return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None
        if kind == "boolean":
            return value if isinstance(value, bool) else None
        if kind == "string":
            return value if isinstance(value, str) else None
        return json.dumps(value, ensure_ascii=False)


def check_annotation(config) -> None:
    """The job's annotation settings against the rest of its config (a ``JobConfig``); ValueError."""
    asked = config.structured is not None or config.input.columns.structured is not None
    if asked and config.media.long_audio == "chunk":
        raise ValueError(
            "structured outputs cannot be checked on a long clip's stitched windows (media.long_audio: chunk). "
            "Try media.long_audio: single."
        )
    typed = config.structured.typed_column if config.structured and config.structured.json_schema else None
    if typed is not None:
        from schemas.rows import OUTPUT_SCHEMA

        taken = [config.output.column_names.get(n, n) for n in OUTPUT_SCHEMA.names]
        if typed in taken or typed in config.output.carry_columns:
            raise ValueError(
                f"structured.typed_column {typed!r} is already an output column. Try another name, e.g. "
                f"typed_column: {typed}_value."
            )


@functools.lru_cache(maxsize=256)
def parse_spec(text: str) -> StructuredSpec:
    """A prepared row's ``structured`` JSON (validated by the CPU stage) as a spec, parsed once per text."""
    return StructuredSpec.from_json(text)
