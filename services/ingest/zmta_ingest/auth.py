"""Checking SMTP AUTH credentials: argon2 hashes from the config, or an HTTP endpoint.

Both take a user name and a password and answer :class:`Outcome`: accepted, refused
(wrong credentials: 535) or unavailable (the check itself failed: 454, try again).
"""

from __future__ import annotations

import asyncio
import enum
import logging
import os
from dataclasses import dataclass
from typing import Protocol

import argon2
import httpx

from zmta_common.config import SmtpInterface

from .tls import StartupError

log = logging.getLogger(__name__)

# The longest user name and password taken (the original's limit).
MAX_CREDENTIAL = 1024


class Outcome(enum.Enum):
    ACCEPTED = "accepted"
    REFUSED = "refused"
    UNAVAILABLE = "unavailable"


@dataclass(slots=True, frozen=True)
class Verdict:
    outcome: Outcome
    reason: str = ""  # for the log: why a check was refused or unavailable


class Authenticator(Protocol):
    async def check(self, username: str, password: str) -> Verdict: ...

    async def close(self) -> None: ...


class PasswordTable:
    """``users: {name: argon2 hash}``. Verification is slow by design (tens of ms, 64 MiB):
    it runs in worker threads, at most one per CPU at a time."""

    def __init__(self, name: str, users: dict[str, str]) -> None:
        for user, hashed in users.items():
            try:
                argon2.extract_parameters(hashed)
            except argon2.exceptions.InvalidHashError:
                raise StartupError(f"smtp_interfaces.{name}.users.{user}: not a valid argon2 hash") from None
        self.users = dict(users)
        self.hasher = argon2.PasswordHasher()
        self.slots = asyncio.Semaphore(os.cpu_count() or 2)
        # Unknown users are checked against this, so that they take as long as known ones.
        self.decoy = self.hasher.hash(os.urandom(16).hex())

    async def check(self, username: str, password: str) -> Verdict:
        hashed = self.users.get(username)
        async with self.slots:
            if hashed is None:
                await asyncio.to_thread(self._verify, self.decoy, password)
                return Verdict(Outcome.REFUSED, "unknown user")
            if await asyncio.to_thread(self._verify, hashed, password):
                return Verdict(Outcome.ACCEPTED)
        return Verdict(Outcome.REFUSED, "wrong password")

    def _verify(self, hashed: str, password: str) -> bool:
        try:
            return self.hasher.verify(hashed, password)
        except argon2.exceptions.VerificationError:
            return False
        except argon2.exceptions.InvalidHashError:
            return False

    async def close(self) -> None:
        return None


class HttpCheck:
    """The original's http-auth plugin: GET ``auth_url?transport=SMTP`` with the credentials
    as HTTP Basic authorization. 2xx accepts, 4xx refuses, anything else (or no answer in
    ``auth_timeout`` seconds) is a temporary failure."""

    def __init__(self, url: str, timeout: float) -> None:
        # The URL's own query stays; transport=SMTP is added to it.
        self.url = httpx.URL(url).copy_merge_params({"transport": "SMTP"})
        self.client = httpx.AsyncClient(timeout=timeout, follow_redirects=False)
        # Our own "auth ..." line is the one per check; the client's traces carry credentials.
        for noisy in ("httpx", "httpcore"):
            logging.getLogger(noisy).setLevel(logging.WARNING)

    async def check(self, username: str, password: str) -> Verdict:
        try:
            response = await self.client.get(self.url, auth=httpx.BasicAuth(username, password))
        except httpx.HTTPError as exc:
            return Verdict(Outcome.UNAVAILABLE, f"{type(exc).__name__}: {exc}")
        if 200 <= response.status_code < 300:
            return Verdict(Outcome.ACCEPTED)
        if 400 <= response.status_code < 500:
            return Verdict(Outcome.REFUSED, f"HTTP {response.status_code}")
        return Verdict(Outcome.UNAVAILABLE, f"HTTP {response.status_code}")

    async def close(self) -> None:
        await self.client.aclose()


def make_authenticator(name: str, interface: SmtpInterface) -> Authenticator | None:
    """How the interface checks AUTH, or None if it offers no AUTH."""
    if not interface.auth:
        return None
    if interface.auth_url is not None:
        return HttpCheck(interface.auth_url, interface.auth_timeout)
    return PasswordTable(name, interface.users)


def hash_password(password: str) -> str:
    """An argon2id hash of ``password`` for ``smtp_interfaces.<name>.users``."""
    return argon2.PasswordHasher().hash(password)
