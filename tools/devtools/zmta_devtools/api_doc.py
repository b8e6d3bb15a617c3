"""The HTTP API reference (docs/api.md), made from the API's OpenAPI schema.

The schema is the one the api serves at ``/openapi.json``, built in-process from
:func:`zmta_api.app.create_app` without a server or a store: every route with its
method, path, description (the route's docstring), parameters, body and responses, and
every model of a request or response, field by field.
"""

from __future__ import annotations

import inspect
import json
from typing import Any, cast

from zmta_api.app import Services, create_app
from zmta_api.security import ANY_KEY, scope_for
from zmta_common.bus import Bus
from zmta_common.config import Config
from zmta_common.store import Store

from .markdown import cell, slug

Schema = dict[str, Any]
METHODS = ("get", "post", "put", "patch", "delete")
# JSON-schema keywords that limit a value, and how they read.
LIMITS = (
    ("minimum", "≥ {}"),
    ("exclusiveMinimum", "> {}"),
    ("maximum", "≤ {}"),
    ("minLength", "at least {} characters"),
    ("maxLength", "at most {} characters"),
    ("pattern", "matching `{}`"),
)


def openapi() -> Schema:
    """The API's OpenAPI schema, as ``/openapi.json`` serves it."""
    # Defaults only (not the environment's ZMTA_* variables), and no connections: building
    # the routes keeps references to the store and the bus, it calls neither.
    services = Services(Config.model_construct(), cast(Store, None), cast(Bus, None))
    return create_app(services).openapi()


def render() -> str:
    """docs/api.md, whole."""
    schema = openapi()
    info = schema["info"]
    parts = [f"# HTTP API\n\n{info['title']} {info['version']}, OpenAPI {schema['openapi']}."]
    parts.append(inspect.cleandoc(info.get("description", "")))
    parts.append(_index(schema))
    for tag, operations in _by_tag(schema).items():
        parts.append(f"## {tag.capitalize()}")
        parts += [_operation(method, path, operation) for method, path, operation in operations]
    parts.append("## Models")
    parts += [_model(name, model) for name, model in schema.get("components", {}).get("schemas", {}).items()]
    return "\n\n".join(part for part in parts if part) + "\n"


Operation = tuple[str, str, Schema]


def _operations(schema: Schema) -> list[Operation]:
    return [
        (method, path, operation)
        for path, item in schema["paths"].items()
        for method, operation in item.items()
        if method in METHODS
    ]


def _by_tag(schema: Schema) -> dict[str, list[Operation]]:
    """The operations grouped by their first tag, in the order the schema has them."""
    groups: dict[str, list[Operation]] = {}
    for method, path, operation in _operations(schema):
        groups.setdefault((operation.get("tags") or ["other"])[0], []).append((method, path, operation))
    return groups


def _title(method: str, path: str) -> str:
    return f"{method.upper()} {path}"


def _index(schema: Schema) -> str:
    rows = ["| route | key | what it does |", "|---|---|---|"]
    for method, path, operation in _operations(schema):
        link = f"[`{_title(method, path)}`](#{slug(_title(method, path))})"
        rows.append(f"| {link} | {_scope(path)} | {cell(_first_sentence(operation))} |")
    return "## Routes\n\n" + "\n".join(rows)


def _scope(path: str) -> str:
    scope = scope_for(path)
    if scope is None:
        return "none"
    return "any key" if scope == ANY_KEY else f"`{scope}` scope"


def _first_sentence(operation: Schema) -> str:
    text = " ".join((operation.get("description") or operation.get("summary") or "").split("\n\n")[0].split())
    head, dot, _ = text.partition(". ")
    return head + "." if dot else text


def _operation(method: str, path: str, operation: Schema) -> str:
    lines = [f"### {_title(method, path)}"]
    if operation.get("deprecated"):
        lines.append("*Deprecated.*")
    lines.append(inspect.cleandoc(operation.get("description") or operation.get("summary") or ""))
    lines.append(f"Key: {_scope(path)}.")
    lines += [_parameters(operation.get("parameters", [])), _body(operation.get("requestBody")), _responses(operation)]
    return "\n\n".join(line for line in lines if line)


def _parameters(parameters: list[Schema]) -> str:
    if not parameters:
        return ""
    rows = ["| parameter | in | type | required | default | meaning |", "|---|---|---|---|---|---|"]
    for parameter in parameters:
        schema = parameter.get("schema", {})
        cells = (
            f"`{parameter['name']}`",
            parameter["in"],
            _type_with_limits(schema),
            "yes" if parameter.get("required") else "no",
            f"`{json.dumps(schema['default'])}`" if "default" in schema else "",
            parameter.get("description") or schema.get("description", ""),
        )
        rows.append("| " + " | ".join(cell(text) for text in cells) + " |")
    return "**Parameters**\n\n" + "\n".join(rows)


def _body(body: Schema | None) -> str:
    if not body:
        return ""
    lines = [f"- `{media}`: {_type(content.get('schema', {}))}" for media, content in body.get("content", {}).items()]
    inline = [c["schema"] for c in body.get("content", {}).values() if "properties" in c.get("schema", {})]
    fields = _fields(inline[0]) if inline else ""
    required = "required" if body.get("required") else "optional"
    return f"**Request body** ({required})\n\n" + "\n".join(lines) + (f"\n\n{fields}" if fields else "")


def _responses(operation: Schema) -> str:
    rows = ["| status | meaning | body |", "|---|---|---|"]
    for status, response in sorted(operation.get("responses", {}).items()):
        content = response.get("content", {})
        body = "; ".join(f"`{media}`: {_type(c.get('schema', {}))}" for media, c in content.items())
        rows.append(f"| {status} | {cell(response.get('description', ''))} | {body} |")
    return "**Responses**\n\n" + "\n".join(rows)


def _model(name: str, model: Schema) -> str:
    parts = [f"### {name}", inspect.cleandoc(model.get("description", "")), _fields(model)]
    return "\n\n".join(part for part in parts if part)


def _fields(model: Schema) -> str:
    properties: Schema = model.get("properties", {})
    if not properties:
        extra = model.get("additionalProperties")
        return f"An object: {_type(model)}." if extra is not None else ""
    required = set(model.get("required", []))
    rows = ["| field | type | required | meaning |", "|---|---|---|---|"]
    for field, schema in properties.items():
        meaning = schema.get("description", "")
        if "default" in schema and schema["default"] not in (None, [], {}):
            meaning = f"{meaning} (default `{json.dumps(schema['default'])}`)".strip()
        cells = (f"`{field}`", _type_with_limits(schema), "yes" if field in required else "no", meaning)
        rows.append("| " + " | ".join(cell(text) for text in cells) + " |")
    return "\n".join(rows)


def _type_with_limits(schema: Schema) -> str:
    limits = [text.format(schema[keyword]) for keyword, text in LIMITS if keyword in schema]
    for option in schema.get("anyOf", []):
        limits += [text.format(option[keyword]) for keyword, text in LIMITS if keyword in option]
    return _type(schema) + (f" ({', '.join(limits)})" if limits else "")


def _type(schema: Schema) -> str:
    """A JSON-schema type as a reader needs it, with models linked to their section."""
    if "$ref" in schema:
        name = schema["$ref"].rsplit("/", 1)[-1]
        return f"[{name}](#{slug(name)})"
    if "anyOf" in schema:
        return " \\| ".join(_type(option) for option in schema["anyOf"])
    if "enum" in schema:
        return " \\| ".join(f"`{json.dumps(value)}`" for value in schema["enum"])
    if "const" in schema:
        return f"`{json.dumps(schema['const'])}`"
    kind = schema.get("type")
    if kind == "array":
        return f"list[{_type(schema.get('items', {}))}]"
    if kind == "object":
        extra = schema.get("additionalProperties")
        return f"dict[string, {_type(extra)}]" if isinstance(extra, dict) and extra else "object"
    return str(kind) if kind else "any"
