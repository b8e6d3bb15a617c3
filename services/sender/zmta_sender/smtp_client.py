"""One delivery attempt over SMTP with aiosmtplib, the body streamed from the store.

aiosmtplib 5.1.3 (pinned) sends DATA only from a message held whole in memory, so
:func:`stream_data` writes the already dot-stuffed chunks to the protocol itself,
with back-pressure, and then reads the final reply. That uses the protocol's
private ``_response_pending`` flag and ``_drain_helper``.

The addresses of the recipient's MX hosts are tried in order until one takes the
transaction. Failing to connect (or a 4xx greeting) moves on to the next address;
a reply to MAIL, RCPT or DATA ends the attempt, to be classified by the caller.
Connections are reused through a :class:`~.connections.ConnectionPool`.
"""

from __future__ import annotations

import functools
import logging
import ssl
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import aiosmtplib
from aiosmtplib import SMTPResponse

from .connections import Connection, ConnectionPool, PoolKey
from .errors import DeliveryError
from .mx import Target

log = logging.getLogger(__name__)


class ReplyError(Exception):
    """The server answered with a failure; ``stage`` is where (connect, mail, rcpt, data)."""

    def __init__(self, code: int, text: str, stage: str, target: Target) -> None:
        super().__init__(f"{code} {text}")
        self.code = code
        self.text = text
        self.stage = stage
        self.target = target


class ConnectionBroken(DeliveryError):
    """The connection failed (not the server's reply) during ``stage`` of a transaction."""

    def __init__(self, message: str, stage: str) -> None:
        super().__init__(message, "network")
        self.stage = stage


@dataclass(slots=True)
class Attempt:
    mail_from: str
    recipient: str
    ehlo_name: str
    source_ip: str | None
    connect_timeout: float
    command_timeout: float


@dataclass(slots=True)
class Accepted:
    target: Target
    response: str


ChunkSource = Callable[[], AsyncIterator[bytes]]


async def deliver(
    attempt: Attempt, targets: list[Target], chunks: ChunkSource, pool: ConnectionPool, group: str | None
) -> Accepted:
    """Try the targets in order; return how the message was accepted or raise why not.

    ``group`` is the MX host group of the recipient's domain, for connection limits.
    """
    last: Exception | None = None
    domain = attempt.recipient.rpartition("@")[2].lower()
    for target in targets:
        key: PoolKey = (attempt.source_ip, attempt.ehlo_name, target.ip, target.port, domain)
        reused = pool.take(key)
        if reused is not None:
            try:
                return await _send(reused, key, pool, attempt, target, chunks)
            except ConnectionBroken as exc:
                if exc.stage != "mail":
                    raise
                # The server dropped the parked connection; a fresh one decides.
        try:
            conn = await pool.open(domain, group, functools.partial(_connect, attempt, target))
        except ReplyError as exc:
            if exc.code >= 500:
                raise  # a permanent refusal at the greeting is for the classifier
            last = exc
            continue
        except DeliveryError as exc:
            last = exc
            if exc.category == "rate":
                break  # no slot: another server of the same domain has none either
            continue
        return await _send(conn, key, pool, attempt, target, chunks)
    if last is None:
        raise DeliveryError("no mail server to try", "dns")
    raise last


async def _send(
    conn: Connection, key: PoolKey, pool: ConnectionPool, attempt: Attempt, target: Target, chunks: ChunkSource
) -> Accepted:
    """One transaction; the connection goes back to the pool if it succeeded, else it is closed."""
    try:
        await pool.pace(conn)
        response = await _transaction(conn.smtp, attempt, target, chunks)
    except BaseException:
        await pool.discard(conn)
        raise
    await pool.give(key, conn)
    return Accepted(target, f"{response.code} {response.message}")


async def _connect(attempt: Attempt, target: Target) -> aiosmtplib.SMTP:
    """Connect, greet and upgrade to TLS when offered; retry once in plain text if TLS fails."""
    try:
        return await _open(attempt, target, use_tls=True)
    except (ssl.SSLError, aiosmtplib.SMTPException) as exc:
        if not _is_tls_failure(exc):
            raise _as_error(exc, target) from None
        log.info("tls failed, retrying without", extra={"mx": target.host, "error": repr(exc)})
    try:
        return await _open(attempt, target, use_tls=False)
    except (ssl.SSLError, aiosmtplib.SMTPException) as exc:
        raise _as_error(exc, target) from None


async def _open(attempt: Attempt, target: Target, use_tls: bool) -> aiosmtplib.SMTP:
    smtp = aiosmtplib.SMTP(
        hostname=target.ip,
        port=target.port,
        local_hostname=attempt.ehlo_name,
        source_address=(attempt.source_ip, 0) if attempt.source_ip else None,
        timeout=attempt.command_timeout,
        start_tls=False,  # done below, so that SNI names the MX host rather than its IP
        validate_certs=False,  # opportunistic TLS: an unverified channel beats plain text
    )
    try:
        await smtp.connect(timeout=attempt.connect_timeout)
    except OSError as exc:
        raise DeliveryError(f"{target.host}[{target.ip}]:{target.port}: {exc}", "network") from None
    try:
        await smtp.ehlo()
        if use_tls and smtp.supports_extension("starttls"):
            await smtp.starttls(server_hostname=target.host, validate_certs=False)
    except BaseException:
        smtp.close()
        raise
    return smtp


def _is_tls_failure(exc: BaseException) -> bool:
    return isinstance(exc, ssl.SSLError) or isinstance(exc.__cause__, ssl.SSLError) or "TLS" in str(exc)


def _as_error(exc: BaseException, target: Target) -> Exception:
    if isinstance(exc, aiosmtplib.SMTPResponseException):
        return ReplyError(exc.code, exc.message, "connect", target)
    return DeliveryError(f"{target.host}[{target.ip}]:{target.port}: {exc}", "network")


async def _transaction(smtp: aiosmtplib.SMTP, attempt: Attempt, target: Target, chunks: ChunkSource) -> SMTPResponse:
    options = ["SMTPUTF8"] if _needs_smtputf8(attempt) and smtp.supports_extension("smtputf8") else []
    stage = "mail"
    try:
        await smtp.mail(attempt.mail_from, options=options, encoding="utf-8")
        stage = "rcpt"
        await smtp.rcpt(attempt.recipient, encoding="utf-8")
        stage = "data"
        return await stream_data(smtp, chunks(), attempt.command_timeout)
    except aiosmtplib.SMTPResponseException as exc:
        raise ReplyError(exc.code, exc.message, stage, target) from None
    except (aiosmtplib.SMTPException, OSError) as exc:
        raise ConnectionBroken(f"{target.host}[{target.ip}] during {stage}: {exc}", stage) from None


def _needs_smtputf8(attempt: Attempt) -> bool:
    return not (attempt.mail_from.isascii() and attempt.recipient.isascii())


async def stream_data(smtp: aiosmtplib.SMTP, chunks: AsyncIterator[bytes], timeout: float) -> SMTPResponse:
    """Send DATA with the body streamed from ``chunks`` (already dot-stuffed, end mark included)."""
    response = await smtp.execute_command(b"DATA", timeout=timeout)
    if response.code != 354:
        raise aiosmtplib.SMTPDataError(response.code, response.message)
    protocol = smtp.protocol
    assert protocol is not None
    protocol._response_pending = True  # keep a reply the server sends before we finish
    async for chunk in chunks:
        protocol.write(chunk)
        await protocol._drain_helper()
    response = await protocol.read_response(timeout=timeout)
    if response.code != 250:
        raise aiosmtplib.SMTPDataError(response.code, response.message)
    return response
