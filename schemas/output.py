"""The output's layout as a job writes it: ``schemas.rows.OUTPUT_SCHEMA`` with the config's renames
(``output.column_names``), the input columns it carries (``output.carry_columns``) and Hugging Face
datasets metadata, so ``datasets.load_dataset("parquet", ...)`` reads every column with its feature type.

The pipeline works in ``OUTPUT_SCHEMA`` throughout (the run's counts, resume and the audit read its
names); ``OutputShape.apply`` is the last step before a part is written.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import pyarrow as pa

from schemas.annotation import JsonArrow
from schemas.multitask import TASK_PREFIX
from schemas.rows import MEDIA_STRUCT, OUTPUT_SCHEMA, TASK_RESULT, Status

HF_METADATA_KEY = b"huggingface"  # where datasets keeps its features in a Parquet file's schema
CARRY_PREFIX = "carry:"  # carried input columns between the stages: no clash with the stages' own columns

# Arrow type -> datasets.Value dtype (the types OUTPUT_SCHEMA uses)
_VALUE_DTYPES = {
    pa.string(): "string",
    pa.large_string(): "large_string",
    pa.int16(): "int16",
    pa.int32(): "int32",
    pa.int64(): "int64",
    pa.float32(): "float32",
    pa.float64(): "float64",
    pa.bool_(): "bool",
}


def hf_feature(arrow_type: pa.DataType) -> dict:
    """datasets' serialised feature for an Arrow type (``Value``, ``List`` of one)."""
    if arrow_type in _VALUE_DTYPES:
        return {"dtype": _VALUE_DTYPES[arrow_type], "_type": "Value"}
    if pa.types.is_list(arrow_type) or pa.types.is_large_list(arrow_type):
        return {"feature": hf_feature(arrow_type.value_type), "_type": "List"}
    if pa.types.is_struct(arrow_type):  # datasets keeps a struct as a plain dict of its fields' features
        return {f.name: hf_feature(f.type) for f in arrow_type}
    raise ValueError(f"no datasets feature for Arrow type {arrow_type}")


def input_features(schema: pa.Schema) -> dict[str, dict]:
    """The datasets features an input file's schema declares (Parquet written by datasets), or none."""
    try:
        return json.loads((schema.metadata or {})[HF_METADATA_KEY])["info"]["features"] or {}
    except (KeyError, TypeError, ValueError):
        return {}


@dataclass(frozen=True)
class Carried:
    """An input column copied into the output (``output.carry_columns``), with its type and datasets
    feature (None: datasets infers it from the Arrow type)."""

    name: str
    type: pa.DataType
    feature: dict | None = None


@dataclass(frozen=True)
class TypedColumn:
    """The output column of ok rows' answers parsed by the job's JSON schema (``structured.typed_column``)."""

    name: str
    schema_json: str  # the JSON schema, as text (hashable)

    @property
    def type(self) -> pa.DataType:
        return JsonArrow(json.loads(self.schema_json)).type

    def column(self, texts: list[str | None]) -> pa.Array:
        """Each answer's value (null for error rows and answers that are not JSON)."""
        convert = JsonArrow(json.loads(self.schema_json))
        values = []
        for text in texts:
            try:
                values.append(None if text is None else convert.value(json.loads(text)))
            except (ValueError, OverflowError, RecursionError):  # never let one answer stop the writer
                values.append(None)
        return pa.array(values, type=convert.type)


@dataclass(frozen=True)
class OutputShape:
    """What ``apply`` does to the last stage's rows (``OUTPUT_SCHEMA`` plus the carried input columns
    under ``CARRY_PREFIX``) before they are written: renames (``output.column_names``), carried columns
    under their own names, datasets metadata for every column."""

    column_names: dict[str, str] = field(default_factory=dict)
    carried: tuple[Carried, ...] = ()
    typed: TypedColumn | None = None
    tasks: tuple[str, ...] = ()  # the job's tasks: one TASK_RESULT struct column each, named after it

    @classmethod
    def of(
        cls,
        column_names: dict[str, str],
        carry: list[str],
        input_schema: pa.Schema,
        media: dict,
        typed: TypedColumn | None = None,
        tasks: tuple[str, ...] = (),
    ) -> OutputShape:
        """``media``: input column name -> "Image" / "Audio" for the job's media columns: a carried one in
        datasets' struct<bytes, path> layout reads back as that feature when the input declares none."""
        declared = input_features(input_schema)
        carried = []
        for name in carry:
            arrow = input_schema.field(name).type
            feature = declared.get(name)
            if feature is None and arrow == MEDIA_STRUCT and name in media:
                feature = {"_type": media[name]}
            carried.append(Carried(name, arrow, feature))
        return cls(dict(column_names), tuple(carried), typed, tuple(tasks))

    def name(self, column: str) -> str:
        return self.column_names.get(column, column)

    @property
    def schema(self) -> pa.Schema:
        fields = [f.with_name(self.name(f.name)) for f in OUTPUT_SCHEMA]
        features = {f.name: hf_feature(f.type) for f in fields}
        for c in self.carried:
            fields.append(pa.field(c.name, c.type))
            if c.feature is not None:
                features[c.name] = c.feature
        if self.typed is not None:
            fields.append(pa.field(self.typed.name, self.typed.type))
            features[self.typed.name] = hf_feature(self.typed.type)
        for name in self.tasks:
            fields.append(pa.field(name, TASK_RESULT))
            features[name] = hf_feature(TASK_RESULT)
        hf = {"info": {"features": features}}
        return pa.schema(
            fields, metadata={**OUTPUT_SCHEMA.metadata, HF_METADATA_KEY: json.dumps(hf).encode()}
        )

    def apply(self, table: pa.Table) -> pa.Table:
        """The last stage's rows -> the table as written (renamed, carried columns appended, metadata)."""
        out = table.select(OUTPUT_SCHEMA.names).cast(OUTPUT_SCHEMA)
        out = out.rename_columns([self.name(n) for n in OUTPUT_SCHEMA.names])
        for c in self.carried:
            out = out.append_column(
                pa.field(c.name, c.type), table.column(CARRY_PREFIX + c.name).cast(c.type)
            )
        if self.typed is not None:
            ok = [s == Status.OK.value for s in table.column("status").to_pylist()]
            texts = [
                t if good else None for t, good in zip(table.column("text").to_pylist(), ok, strict=True)
            ]
            out = out.append_column(pa.field(self.typed.name, self.typed.type), self.typed.column(texts))
        for name in self.tasks:
            out = out.append_column(
                pa.field(name, TASK_RESULT), table.column(TASK_PREFIX + name).cast(TASK_RESULT)
            )
        return out.cast(self.schema)


def carry(source: pa.Table, into: pa.Table, names: list[str]) -> pa.Table:
    """``into`` (rows in ``source``'s order) with ``source``'s columns ``names`` appended under
    ``CARRY_PREFIX``; a column ``source`` lacks (a file without it) is carried as nulls."""
    for name in names:
        column = source.column(name) if name in source.column_names else pa.nulls(source.num_rows)
        into = into.append_column(CARRY_PREFIX + name, column)
    return into


def carried_names(table: pa.Table) -> list[str]:
    """The carried columns' names in a stage's table, prefix and all."""
    return [n for n in table.column_names if n.startswith(CARRY_PREFIX)]
