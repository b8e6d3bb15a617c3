"""The FastAPI application: routes with the original's paths and JSON shapes.

``create_app`` is the one place that wires the routers (``routes_*``) and the error
handlers. Every error is JSON ``{"error": ..., "field": ...}`` with a 4xx status (503
when the store or Redis cannot be reached); bad input never gets a 500.
"""

from __future__ import annotations

import logging
import re
from typing import Any

import asyncpg
import redis.exceptions
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from . import routes_admin, routes_log, routes_queue, routes_send, routes_shaping
from .common import ApiError, Services
from .console import mount_console
from .models import ErrorResponse
from .security import PUBLIC_PATHS, Gate

__all__ = ["ApiError", "Services", "create_app"]

log = logging.getLogger(__name__)

# Where a validation error sits: request parts, and the union/type tags pydantic adds to a location.
_LOCATIONS = {"body", "query", "path", "header", "cookie"}
_TYPE_TAG = re.compile(
    r"^(str|int|float|bool|bytes|none|(list|dict|tuple|set|literal|union|nullable|tagged-union|function-\w+)\[.*\]"
    r"|[A-Z][A-Za-z0-9]*)$"
)


# What the schema (and docs/api.md, made from it) says of the API as a whole.
DESCRIPTION = """\
Paths and JSON shapes follow the original's README (and what zmta-webadmin reads). Errors are
JSON `{"error": "...", "field": "..."}` naming the bad field, with a 4xx status (503 when the
store or Redis cannot be reached); bad input never gets a 500.

**API keys.** Every route but `/health` needs a key: `/send` and `/send-raw` the `send`
scope, `/openapi.json`, `/docs` and `/redoc` any valid key (none with `api.public_docs`),
every other route `admin`. The key is checked from the headers, before the body is read.
Without one the answer is 401, with a key that lacks the scope 403. Make a key with
`python -m zmta_api new-key --name webadmin --scopes admin,send` (the web admin's upload page
posts to `/send-raw`, hence `send` as well): it prints the key (give it to the client) and the
`api.keys` entry with its SHA-256 hash (put that in the config, or in the YAML list of
`api.keys_file`, e.g. a mounted Kubernetes Secret). Present it as `Authorization: Bearer <key>`,
`X-API-Key: <key>`, or as the password of HTTP Basic credentials, so a tool that only takes an
URL works unchanged: zmta-webadmin with `http://webadmin:<key>@127.0.0.1:12080`.
`X-Authenticated-User` and `X-Originating-IP` are believed only from keys with
`may_set_user: true`; other keys are recorded as the message's user by their name.
`api.open_access: true` gives the original's open API, and is refused unless the API listens
on loopback (the development config and the example below use it; add
`-H "Authorization: Bearer $KEY"` otherwise).

```
curl -H 'Content-Type: application/json' -H 'X-Authenticated-User: andris' \\
  -H 'X-Originating-IP: 123.123.123.123' -X POST http://127.0.0.1:12080/send \\
  -d '{"from": "sender@example.com", "to": "recipient1@example.com, recipient2@example.com",
       "subject": "hello", "text": "hello world!"}'
# -> {"id": "1a213c759830000c39", "from": "sender@example.com",
#     "to": ["recipient1@example.com", "recipient2@example.com"],
#     "response": "Message queued as 1a213c759830000c39"}
```

Every time written as a string (`created`, `queued`, `expires`) has one format, the one the
original's JSON gives a date (JavaScript's `toISOString()`): UTC with milliseconds and `Z`,
e.g. `2026-05-04T10:00:00.000Z`; the times inside `/message` and `/blacklist` are numbers
(ms since the epoch), as there in the original.

Domains are shown, and may be given, in their canonical form (lower case, an international
name as its A-label); a U-label given to `/pause` or `/suppressionlist` is stored as its A-label.

As the original, the web admin's forms with a trailing slash work too: `PUT` and `DELETE`
`/message/<id>/` act on the whole message, as `/message/<id>` does.

The OpenAPI schema is served at `/openapi.json` (and browsable at `/docs`); it describes every
route, its models and the key schemes.
"""


def create_app(services: Services) -> FastAPI:
    app = FastAPI(title="ZoneMTA-py", version="0.1.0", description=DESCRIPTION)
    # Every request: the caller's API key, and the size of its body (see security.py).
    app.add_middleware(Gate, api=services.config.api)
    app.state.services = services
    mount_console(app)  # the web console's static files at /ui (console.py)

    @app.exception_handler(ApiError)
    async def api_error(_: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(ErrorResponse(error=exc.error, field=exc.field).model_dump(exclude_none=True), exc.status)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0]
        loc = [str(p) for p in first.get("loc", ())]
        if loc and loc[0] in _LOCATIONS:
            loc = loc[1:]
        if first.get("type") == "json_invalid":
            return JSONResponse({"error": f"the body is not valid JSON: {first.get('msg', '')}"}, 400)
        field = ".".join(p for p in loc if not _TYPE_TAG.match(p))
        return JSONResponse({"error": f"{field or 'body'}: {first.get('msg', 'invalid')}", "field": field or None}, 400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse({"error": str(exc.detail)}, exc.status_code, headers=exc.headers)

    async def unavailable(_: Request, exc: Exception) -> JSONResponse:
        log.warning("backend unavailable", extra={"error": repr(exc)})
        return JSONResponse({"error": "the queue store is not reachable right now, try again later"}, 503)

    for kind in (
        OSError,
        asyncpg.PostgresConnectionError,
        asyncpg.InterfaceError,
        asyncpg.CannotConnectNowError,
        redis.exceptions.ConnectionError,
        redis.exceptions.TimeoutError,
    ):
        app.add_exception_handler(kind, unavailable)

    app.include_router(routes_send.router(services))
    app.include_router(routes_queue.router(services))
    app.include_router(routes_admin.router(services))
    app.include_router(routes_shaping.router(services))
    app.include_router(routes_log.router(services))

    def openapi() -> dict[str, Any]:
        """FastAPI's schema, with the 400 that bad input really gets in place of its default 422."""
        if app.openapi_schema is None:
            schema = FastAPI.openapi(app)
            error = {"$ref": "#/components/schemas/ErrorResponse"}
            for operations in schema.get("paths", {}).values():
                for operation in operations.values():
                    responses = operation.get("responses", {})
                    if responses.pop("422", None) is not None and "400" not in responses:
                        responses["400"] = {
                            "description": "Bad Request",
                            "content": {"application/json": {"schema": error}},
                        }
            _document_security(schema)
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            components.setdefault("ErrorResponse", ErrorResponse.model_json_schema())
            for unused in ("HTTPValidationError", "ValidationError"):
                components.pop(unused, None)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app


def _document_security(schema: dict[str, Any]) -> None:
    """The key schemes, and the 401/403 every route but /health can answer."""
    schemes = schema.setdefault("components", {}).setdefault("securitySchemes", {})
    schemes["bearer"] = {"type": "http", "scheme": "bearer"}
    schemes["apiKey"] = {"type": "apiKey", "in": "header", "name": "X-API-Key"}
    schemes["basic"] = {"type": "http", "scheme": "basic"}
    error = {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}}
    for path, operations in schema.get("paths", {}).items():
        if path in PUBLIC_PATHS:
            continue
        for operation in operations.values():
            operation["security"] = [{"bearer": []}, {"apiKey": []}, {"basic": []}]
            responses = operation.setdefault("responses", {})
            responses.setdefault("401", {"description": "No API key, or not a valid one", **error})
            responses.setdefault("403", {"description": "The key lacks the route's scope", **error})
