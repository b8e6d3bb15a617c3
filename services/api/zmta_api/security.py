"""API keys: who may call which route, and how much of a body the API reads.

Every route but ``/health`` (and the web console's static files under ``/ui``, which hold
no data) needs a key; ``/send`` and ``/send-raw`` need the ``send``
scope, the schema and the documentation pages (``/openapi.json``, ``/docs``, ``/redoc``)
any valid key unless ``api.public_docs``, everything else ``admin``. A key is presented
as ``Authorization: Bearer <key>``, as ``X-API-Key: <key>``, or as the password of HTTP
Basic credentials (so a tool that only takes an URL, such as zmta-webadmin, can use
``http://webadmin:<key>@host:port``).

Keys are stored as SHA-256 hashes, not with a slow password hash: they are long random
tokens (``python -m zmta_api new-key``), for which a fast hash is as safe and costs
nothing per request. ``api.open_access`` gives the original's open API, for an API that
listens on loopback only (the config refuses it elsewhere).

:class:`Gate` is a plain ASGI middleware rather than a FastAPI dependency because
FastAPI reads (and parses) a route's body before it solves its dependencies: a key
checked there comes after a 50 MiB body is in memory. The gate decides from the headers
alone, then counts the body as the route reads it and stops at the limit.
(FastAPI's own ``max_body_size`` answers in plain text and knows nothing of keys.)
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
import secrets
from dataclasses import dataclass
from pathlib import Path

import yaml
from fastapi import Request
from pydantic import TypeAdapter, ValidationError
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from zmta_common.config import API_SCOPES, Api, ApiKey

PUBLIC_PATHS = frozenset({"/health"})
SEND_PATHS = frozenset({"/send", "/send-raw"})
DOC_PATHS = frozenset({"/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"})
ANY_KEY = "any"  # the "scope" of the documentation: any valid key will do
# The web console's static files (console.py), public as /health is: /ui, /ui/ and /ui/<file>,
# one plain file name and no deeper path, so neither an API route nor anything outside the
# console's folder. They hold no data: the pages fetch it from the API with the operator's key.
CONSOLE_FILES = re.compile(r"/ui(/([A-Za-z0-9_-]+\.(html|js|css))?)?")
# The most a route other than /send and /send-raw reads of a body (theirs: api.max_body).
ADMIN_MAX_BODY = 1024 * 1024


class KeyFileError(ValueError):
    """``api.keys_file`` cannot be read or holds a bad entry."""


@dataclass(frozen=True, slots=True)
class Caller:
    name: str
    scopes: frozenset[str]
    may_set_user: bool


OPEN = Caller("open-access", frozenset(API_SCOPES), may_set_user=True)


def new_key() -> tuple[str, str]:
    """A fresh random key and the hash to put in ``api.keys``."""
    key = "zmta_" + secrets.token_urlsafe(32)
    return key, "sha256:" + hashlib.sha256(key.encode()).hexdigest()


def scope_for(path: str, public_docs: bool = False) -> str | None:
    """The scope a route needs (:data:`ANY_KEY` for the documentation), or None for a public one."""
    if path in PUBLIC_PATHS or CONSOLE_FILES.fullmatch(path) or (public_docs and path in DOC_PATHS):
        return None
    if path in DOC_PATHS:
        return ANY_KEY
    return "send" if path in SEND_PATHS else "admin"


def load_keys(api: Api) -> list[ApiKey]:
    keys = list(api.keys)
    if api.keys_file:
        try:
            entries = yaml.safe_load(Path(api.keys_file).read_text()) or []
            keys += TypeAdapter(list[ApiKey]).validate_python(entries)
        except (OSError, yaml.YAMLError, ValidationError) as exc:
            raise KeyFileError(f"api.keys_file {api.keys_file}: {exc}") from None
    return keys


def presented_key(headers: Headers) -> str | None:
    header = headers.get("authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    if scheme.lower() == "basic" and value.strip():
        try:
            _, _, password = base64.b64decode(value.strip(), validate=True).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return None
        return password or None
    return headers.get("x-api-key") or None


class Refused(Exception):
    """A request answered from its headers: no key, a bad one, or a body too large."""

    def __init__(self, status: int, error: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(error)
        self.status = status
        self.error = error
        self.headers = headers


class BodyTooLarge(HTTPException):
    """Raised where a route reads past its body limit; answered 413 by the app's handler."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"request body over {limit} bytes")


class Guard:
    """Who a request comes from, judged from its headers alone."""

    def __init__(self, api: Api) -> None:
        self.open = api.open_access
        self.public_docs = api.public_docs
        self.keys = {key.hash.partition(":")[2]: key for key in load_keys(api)}

    def caller(self, path: str, headers: Headers) -> Caller | None:
        """The caller (None for a public route); raises :class:`Refused` for 401 and 403."""
        scope = scope_for(path, self.public_docs)
        if scope is None:
            return None
        if self.open:
            return OPEN
        presented = presented_key(headers)
        if presented is None:
            raise Refused(401, "an API key is needed (Authorization: Bearer <key>)", _challenge())
        key = self.keys.get(hashlib.sha256(presented.encode()).hexdigest())
        if key is None:
            raise Refused(401, "the API key is not valid", _challenge())
        if scope != ANY_KEY and scope not in key.scopes:
            raise Refused(403, f"the key {key.name!r} has no {scope!r} scope")
        return Caller(key.name, frozenset(key.scopes), key.may_set_user)


class Gate:
    """ASGI middleware: the key is checked, and an announced body over the route's limit
    refused, before the body is read; a body that grows past the limit while it is being
    read stops there (:class:`BodyTooLarge`)."""

    def __init__(self, app: ASGIApp, api: Api) -> None:
        self.app = app
        self.guard = Guard(api)
        self.max_body = api.max_body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        path: str = scope["path"]
        limit = self.max_body if path in SEND_PATHS else ADMIN_MAX_BODY
        try:
            who = self.guard.caller(path, headers)
            length = headers.get("content-length", "")
            if length.isdigit() and int(length) > limit:
                raise Refused(413, f"request body over {limit} bytes")
        except Refused as exc:
            # The body is never read; the server closes the connection after this answer.
            await JSONResponse({"error": exc.error}, exc.status, headers=exc.headers)(scope, receive, send)
            return
        if who is not None:
            scope.setdefault("state", {})["caller"] = who
        await self.app(scope, _counted(receive, limit), send)


def _counted(receive: Receive, limit: int) -> Receive:
    read = 0

    async def receive_counted() -> Message:
        nonlocal read
        message = await receive()
        if message["type"] == "http.request":
            read += len(message.get("body", b""))
            if read > limit:
                raise BodyTooLarge(limit)
        return message

    return receive_counted


def _challenge() -> dict[str, str]:
    return {"WWW-Authenticate": 'Bearer realm="zonemta"'}


def caller(request: Request) -> Caller | None:
    value = getattr(request.state, "caller", None)
    return value if isinstance(value, Caller) else None
