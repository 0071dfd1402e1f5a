"""The config reference (docs/config.md), generated from the pydantic models' own field descriptions, so the
reference is the code's: ``python -m schemas.reference > docs/config.md`` writes it, and
tests/unit/test_config_reference.py fails when the file and the models differ.

Every field of every section is listed with its type, default and description; a section that is a model
(``engine``) or a mapping/list of models (``tasks``) is walked into.
"""

from __future__ import annotations

import enum
import types
import typing

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from schemas.job import JobConfig


def _models_in(annotation) -> list[type[BaseModel]]:
    """The pydantic models an annotation holds (``X``, ``X | None``, ``dict[str, X]``, ``list[X]``)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in typing.get_args(annotation) for m in _models_in(arg)]


def _type_name(annotation) -> str:
    if annotation is type(None):
        return "null"
    if isinstance(annotation, type):
        if issubclass(annotation, enum.Enum):
            return " / ".join(repr(m.value) for m in annotation)
        return annotation.__name__
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Literal:
        return " / ".join(repr(a) for a in args)
    if origin is typing.Annotated:
        return _type_name(args[0])
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in args)
    if origin is not None:
        name = getattr(origin, "__name__", str(origin))
        return f"{name}[{', '.join(_type_name(a) for a in args)}]"
    return str(annotation)


def _default(field) -> str:
    if field.default_factory is not None:
        try:
            value = field.default_factory()
        except TypeError:  # a factory that needs the validated data
            return "(computed)"
        if isinstance(value, BaseModel):
            return "(see below)"
        return f"`{value!r}`"
    if field.default is PydanticUndefined:
        return "required"
    value = field.default.value if isinstance(field.default, enum.Enum) else field.default
    return f"`{value!r}`"


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def one_type(annotation):
    """The one type an annotation allows besides None: ``str`` for ``str | None`` or ``Annotated[str, ...]``;
    any other annotation as it is."""
    if typing.get_origin(annotation) is typing.Annotated:
        return one_type(typing.get_args(annotation)[0])
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        kinds = [a for a in typing.get_args(annotation) if a is not type(None)]
        return one_type(kinds[0]) if len(kinds) == 1 else annotation
    return annotation


def rows(model: type[BaseModel], prefix: str, seen: set) -> list[tuple[str, str, str, str, list, str]]:
    """A section's keys: each with its type, default, description, the models it holds that are not listed
    yet, and the prefix of their keys (a mapping of models, such as ``tasks``, is keyed by the user's names)."""
    out = []
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        nested = [m for m in _models_in(field.annotation) if m not in seen]
        child = f"{key}.<name>." if typing.get_origin(one_type(field.annotation)) is dict else f"{key}."
        out.append(
            (key, _type_name(field.annotation), _default(field), field.description or "", nested, child)
        )
    return out


def reference() -> str:
    lines = [
        "# Config reference",
        "",
        "Every key of a job's YAML config (`schemas/job.py` and the modules it joins), generated from the",
        "models' own descriptions by `python -m schemas.reference`; a unit test keeps this file equal to it.",
        "Unknown keys are refused; every number is finite and bounded.",
    ]
    seen: set = {JobConfig}
    queue: list[tuple[str, type[BaseModel]]] = [("", JobConfig)]
    while queue:
        prefix, model = queue.pop(0)
        lines += ["", f"## `{prefix.rstrip('.')}`" if prefix else "## Sections", ""]
        if model.__doc__ and prefix and model.__doc__.strip() != BaseModel.__doc__.strip():
            lines += [_cell(model.__doc__.strip().split("\n\n")[0]), ""]
        lines += ["| key | type | default | description |", "| --- | --- | --- | --- |"]
        for key, type_name, default, description, nested, child in rows(model, prefix, seen):
            lines.append(f"| `{key}` | {_cell(type_name)} | {_cell(default)} | {_cell(description)} |")
            seen.update(nested)
            queue += [(child, sub) for sub in nested]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(reference(), end="")
