"""Checking SMTP AUTH credentials: argon2 hashes from the config, or an HTTP endpoint.

Both take a user name and a password and answer :class:`Outcome`: accepted, refused
(wrong credentials: 535) or unavailable (the check itself failed: 454, try again).
"""

from __future__ import annotations

import asyncio
import enum
import logging
import os
from concurrent.futures import ThreadPoolExecutor
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
    it runs in ``concurrency`` threads of its own, so a crowd of guessers costs at most
    ``concurrency`` times 64 MiB; as many more checks may wait for a thread, and past that
    a check is answered "unavailable" (454) at once rather than queued without bound."""

    def __init__(self, name: str, users: dict[str, str], concurrency: int = 2) -> None:
        for user, hashed in users.items():
            try:
                argon2.extract_parameters(hashed)
            except argon2.exceptions.InvalidHashError:
                raise StartupError(f"smtp_interfaces.{name}.users.{user}: not a valid argon2 hash") from None
        self.users = dict(users)
        self.hasher = argon2.PasswordHasher()
        self.executor = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix=f"argon2-{name}")
        self.max_pending = 2 * concurrency  # running and waiting
        self.pending = 0
        # Unknown users are checked against this, so that they take as long as known ones.
        self.decoy = self.hasher.hash(os.urandom(16).hex())

    async def check(self, username: str, password: str) -> Verdict:
        if self.pending >= self.max_pending:
            return Verdict(Outcome.UNAVAILABLE, "too many password checks in flight")
        hashed = self.users.get(username)
        self.pending += 1
        try:
            loop = asyncio.get_running_loop()
            matched = await loop.run_in_executor(self.executor, self._verify, hashed or self.decoy, password)
        finally:
            self.pending -= 1
        if hashed is None:
            return Verdict(Outcome.REFUSED, "unknown user")
        return Verdict(Outcome.ACCEPTED) if matched else Verdict(Outcome.REFUSED, "wrong password")

    def _verify(self, hashed: str, password: str) -> bool:
        try:
            return self.hasher.verify(hashed, password)
        except argon2.exceptions.VerificationError:
            return False
        except argon2.exceptions.InvalidHashError:
            return False

    async def close(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)


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
    return PasswordTable(name, interface.users, interface.auth_concurrency)


def hash_password(password: str) -> str:
    """An argon2id hash of ``password`` for ``smtp_interfaces.<name>.users``."""
    return argon2.PasswordHasher().hash(password)
