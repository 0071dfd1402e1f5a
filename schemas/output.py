"""The output's layout as a job writes it: ``schemas.rows.OUTPUT_SCHEMA`` with the config's renames
(``output.column_names``) and Hugging Face datasets metadata, so ``datasets.load_dataset("parquet", ...)``
reads every column with its feature type.

The pipeline works in ``OUTPUT_SCHEMA`` throughout (the run's counts, resume and the audit read its
names); ``OutputShape.apply`` is the last step before a part is written.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import pyarrow as pa

from schemas.rows import OUTPUT_SCHEMA

HF_METADATA_KEY = b"huggingface"  # where datasets keeps its features in a Parquet file's schema

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
    raise ValueError(f"no datasets feature for Arrow type {arrow_type}")


@dataclass(frozen=True)
class OutputShape:
    """Renames of output columns (``output.column_names``): what ``apply`` does to a table in
    ``OUTPUT_SCHEMA`` before it is written."""

    column_names: dict[str, str] = field(default_factory=dict)

    def name(self, column: str) -> str:
        return self.column_names.get(column, column)

    @property
    def schema(self) -> pa.Schema:
        fields = [f.with_name(self.name(f.name)) for f in OUTPUT_SCHEMA]
        features = {f.name: hf_feature(f.type) for f in fields}
        hf = {"info": {"features": features}}
        return pa.schema(
            fields, metadata={**OUTPUT_SCHEMA.metadata, HF_METADATA_KEY: json.dumps(hf).encode()}
        )

    def apply(self, table: pa.Table) -> pa.Table:
        """A table in ``OUTPUT_SCHEMA`` -> the table as written (renamed, with its metadata)."""
        table = table.select(OUTPUT_SCHEMA.names).cast(OUTPUT_SCHEMA)
        return table.rename_columns([self.name(n) for n in OUTPUT_SCHEMA.names]).cast(self.schema)
