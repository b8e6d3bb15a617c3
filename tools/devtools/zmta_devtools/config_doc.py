"""The configuration reference (docs/configuration.md), made from the config models.

Every key is a field of a model in :mod:`zmta_common.config`: its type, limits and default
come from the field, its meaning from the field's ``description``, and the prose around
each table from the model's docstring (the introduction from the module's). So the
reference says what the code does, and a key without a description is an error here.
"""

from __future__ import annotations

import inspect
import json
import re
import types
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel
from pydantic.fields import FieldInfo

from zmta_common import config

from .markdown import cell, slug

# What the documentation calls the key of each mapping of sections ("zones.<name>").
PLACEHOLDERS = {"domains": "domain", "mx_hosts": "pattern", "plugins": "import.path"}
# The constraints of annotated_types that a field may carry, and how they read.
BOUNDS = (("ge", "≥"), ("gt", ">"), ("le", "≤"), ("lt", "<"))


class UndescribedKey(ValueError):
    """A config key has no description: the reference cannot say what it is for."""


@dataclass(frozen=True, slots=True)
class Table:
    """One model of the configuration, at ``path`` (the top level: ""), held by ``holder``,
    ``depth`` models below the top."""

    path: str
    model: type[BaseModel]
    holder: FieldInfo | None
    depth: int


def render() -> str:
    """docs/configuration.md, whole."""
    parts = [inspect.cleandoc(config.__doc__ or "")]
    parts += [_section(table) for table in tables(config.Config)]
    return "# Configuration\n\n" + "\n\n".join(parts) + "\n"


def undescribed() -> list[str]:
    """Every key without a description, as its dotted path."""
    return [_key(table.path, name) for table in tables(config.Config) for name in _missing(table)]


def tables(model: type[BaseModel], path: str = "", holder: FieldInfo | None = None, depth: int = 0) -> Iterator[Table]:
    """The model at ``path``, then every model nested in it, depth first in field order."""
    yield Table(path, model, holder, depth)
    for name, info in model.model_fields.items():
        nested = _nested(info.annotation)
        if nested is not None:
            child, suffix = nested
            child_path = _key(path, name) + suffix.replace("*", PLACEHOLDERS.get(name, "name"))
            yield from tables(child, child_path, info, depth + 1)


def _nested(annotation: Any) -> tuple[type[BaseModel], str] | None:
    """The model a field holds and how its path goes on: itself (""), a mapping ("<*>"), a list ("[]")."""
    if _is_model(annotation):
        return annotation, ""
    args = get_args(annotation)
    if get_origin(annotation) is dict and _is_model(args[1]):
        return args[1], ".<*>"
    if get_origin(annotation) is list and _is_model(args[0]):
        return args[0], "[]"
    return None


def _is_model(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def _key(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _missing(table: Table) -> list[str]:
    return [name for name, info in table.model.model_fields.items() if not (info.description or "").strip()]


def _section(table: Table) -> str:
    """The model's heading, the summary of its docstring, its table, then the rest of the docstring."""
    title = f"{'#' * min(table.depth + 1, 3)} `{table.path}`" if table.path else "## Top-level keys"
    doc = table.model.__dict__.get("__doc__")
    summary, _, rest = inspect.cleandoc(doc).partition("\n\n") if doc else ("", "", "")
    return "\n\n".join(block for block in (title, summary, _table(table), rest) if block)


def _table(table: Table) -> str:
    missing = _missing(table)
    if missing:
        raise UndescribedKey(f"config key {_key(table.path, missing[0])} has no description (Field(description=...))")
    rows = ["| key | type | default | meaning |", "|---|---|---|---|"]
    for name, info in table.model.model_fields.items():
        key = _key(table.path, name)
        default = f"[below](#{slug(key)})" if _is_model(info.annotation) else _default(info)
        cells = (f"`{key}`", _type(info), default, info.description or "")
        rows.append("| " + " | ".join(cell(text) for text in cells) + " |")
    return "\n".join(rows)


def _type(info: FieldInfo) -> str:
    bounds = [f"{sign} {_scalar(getattr(m, attr))}" for m in info.metadata for attr, sign in BOUNDS if hasattr(m, attr)]
    if any(getattr(m, "min_length", None) for m in info.metadata):
        bounds.append("not empty")
    name = type_name(info.annotation)
    return f"{name} ({', '.join(bounds)})" if bounds else name


def type_name(annotation: Any) -> str:
    """A type as a reader of the YAML file needs it: ``int``, ``list[str]``, ``"a" | "b" | null``."""
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Annotated:
        return type_name(args[0])
    if origin is Literal:
        return " | ".join(json.dumps(arg) for arg in args)
    if origin in (Union, types.UnionType):
        return " | ".join(type_name(arg) for arg in args)
    if origin in (list, dict):
        return f"{origin.__name__}[{', '.join(type_name(arg) for arg in args)}]"
    if annotation is type(None):
        return "null"
    return annotation.__name__ if isinstance(annotation, type) else str(annotation)


def _default(info: FieldInfo) -> str:
    extra = info.json_schema_extra
    if isinstance(extra, dict) and config.DOC_DEFAULT in extra:
        return str(extra[config.DOC_DEFAULT])
    if info.is_required():
        return "required"
    return f"`{_value(info.get_default(call_default_factory=True), top=True)}`"


def _value(value: Any, top: bool = False) -> str:
    """A default in YAML flow style; a model as the keys it sets apart from its defaults."""
    if isinstance(value, BaseModel):
        value = value.model_dump(exclude_defaults=True)
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_mapping_key(k)}: {_value(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(_value(item) for item in value) + "]"
    if isinstance(value, str):
        return value if top and value else json.dumps(value, ensure_ascii=False)
    return _scalar(value)


def _mapping_key(key: str) -> str:
    return key if re.fullmatch(r"[A-Za-z0-9_.-]+", key) else json.dumps(key, ensure_ascii=False)


def _scalar(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)
