"""API keys: who may call which route.

Every route but ``/health`` needs a key; ``/send`` and ``/send-raw`` need the ``send``
scope, everything else ``admin``. A key is presented as ``Authorization: Bearer <key>``,
as ``X-API-Key: <key>``, or as the password of HTTP Basic credentials (so a tool that
only takes an URL, such as zmta-webadmin, can use ``http://webadmin:<key>@host:port``).

Keys are stored as SHA-256 hashes, not with a slow password hash: they are long random
tokens (``python -m zmta_api new-key``), for which a fast hash is as safe and costs
nothing per request. ``api.open_access`` gives the original's open API, for an API that
listens on loopback only (the config refuses it elsewhere).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import secrets
from dataclasses import dataclass
from pathlib import Path

import yaml
from fastapi import HTTPException, Request
from pydantic import TypeAdapter, ValidationError

from zmta_common.config import API_SCOPES, Api, ApiKey

PUBLIC_PATHS = frozenset({"/health"})
SEND_PATHS = frozenset({"/send", "/send-raw"})


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


def scope_for(path: str) -> str | None:
    """The scope a route needs, or None for a public one."""
    if path in PUBLIC_PATHS:
        return None
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


def presented_key(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    if scheme.lower() == "basic" and value.strip():
        try:
            _, _, password = base64.b64decode(value.strip(), validate=True).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return None
        return password or None
    return request.headers.get("x-api-key") or None


class Guard:
    """The app-wide dependency that checks the key of every request."""

    def __init__(self, api: Api) -> None:
        self.open = api.open_access
        self.keys = {key.hash.partition(":")[2]: key for key in load_keys(api)}

    async def __call__(self, request: Request) -> None:
        scope = scope_for(request.url.path)
        if scope is None:
            return
        if self.open:
            request.state.caller = OPEN
            return
        presented = presented_key(request)
        if presented is None:
            raise HTTPException(401, "an API key is needed (Authorization: Bearer <key>)", _challenge())
        key = self.keys.get(hashlib.sha256(presented.encode()).hexdigest())
        if key is None:
            raise HTTPException(401, "the API key is not valid", _challenge())
        if scope not in key.scopes:
            raise HTTPException(403, f"the key {key.name!r} has no {scope!r} scope")
        request.state.caller = Caller(key.name, frozenset(key.scopes), key.may_set_user)


def _challenge() -> dict[str, str]:
    return {"WWW-Authenticate": 'Bearer realm="zonemta"'}


def caller(request: Request) -> Caller | None:
    value = getattr(request.state, "caller", None)
    return value if isinstance(value, Caller) else None
