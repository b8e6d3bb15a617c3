"""One delivery attempt over SMTP with aiosmtplib, the body streamed from the store.

aiosmtplib 5.1.3 (pinned) sends DATA only from a message held whole in memory, so
:func:`stream_data` writes the already dot-stuffed chunks to the protocol itself,
with back-pressure, and then reads the final reply. That uses the protocol's
private ``_response_pending`` flag and ``_drain_helper``.

The addresses of the recipient's MX hosts are tried in order until one takes the
transaction. Failing to connect (or a 4xx greeting, or TLS that the delivery's
:class:`~.tls.TlsPolicy` requires and the server does not give) moves on to the next
address; a reply to MAIL, RCPT or DATA ends the attempt, to be classified by the caller.
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
from .tls import NONE, REQUIRED, TlsOutcome, TlsPolicy, outcome

log = logging.getLogger(__name__)


class ReplyError(Exception):
    """The server answered with a failure; ``stage`` is where (connect, mail, rcpt, data)."""

    def __init__(self, code: int, text: str, stage: str, target: Target, tls: TlsOutcome | None = None) -> None:
        super().__init__(f"{code} {text}")
        self.code = code
        self.text = text
        self.stage = stage
        self.target = target
        self.tls = tls  # the session's TLS, when the refusal came after the greeting


class TlsFailure(Exception):
    """STARTTLS was not offered (``offered`` false), refused, or its handshake failed."""

    def __init__(self, detail: str, offered: bool = True, certificate: bool = False) -> None:
        super().__init__(detail)
        self.offered = offered
        self.certificate = certificate  # the handshake failed on the certificate check

    def deferral(self, policy: TlsPolicy, target: Target) -> DeliveryError:
        where = f"{target.host}[{target.ip}]"
        if not self.offered:
            return DeliveryError(f"TLS required by {policy.source} but {where} does not offer STARTTLS", "tls")
        return DeliveryError(f"TLS required by {policy.source}: {where} {self}", "tls")


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
    tls: TlsPolicy


@dataclass(slots=True)
class Accepted:
    target: Target
    response: str
    tls: TlsOutcome


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
        reused = await pool.take(key)
        if reused is not None and not attempt.tls.satisfied_by(outcome(reused.smtp)):
            await pool.discard(reused)  # parked before the domain's policy demanded more
            reused = None
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
        tls = outcome(conn.smtp)
        response = await _transaction(conn.smtp, attempt, target, chunks, tls)
    except BaseException:
        await pool.discard(conn)
        raise
    await pool.give(key, conn)
    return Accepted(target, f"{response.code} {response.message}", tls)


async def _connect(attempt: Attempt, target: Target) -> aiosmtplib.SMTP:
    """Connect, greet and STARTTLS as the delivery's TLS policy says."""
    policy = attempt.tls
    try:
        if policy.mode == NONE:
            return await _open(attempt, target, None)
        if policy.mode == REQUIRED:
            return await _open(attempt, target, policy.contexts.verifying, required=True)
        return await _opportunistic(attempt, target)
    except TlsFailure as exc:
        raise exc.deferral(policy, target) from None
    except (ssl.SSLError, aiosmtplib.SMTPException) as exc:
        raise _as_error(exc, target) from None


async def _opportunistic(attempt: Attempt, target: Target) -> aiosmtplib.SMTP:
    """Verified TLS if the certificate allows, else unverified TLS, else (once) plain text."""
    contexts = attempt.tls.contexts
    server = f"{target.host}[{target.ip}]:{target.port}"
    tries = [contexts.verifying, contexts.unverified]
    if contexts.unverifiable(server):
        tries = tries[1:]
    for context in tries:
        try:
            return await _open(attempt, target, context)
        except TlsFailure as exc:
            if not exc.certificate:
                log.info("tls failed, retrying without", extra={"mx": server, "error": str(exc)})
                break
            contexts.remember_unverifiable(server)
    return await _open(attempt, target, None)


async def _open(
    attempt: Attempt, target: Target, context: ssl.SSLContext | None, required: bool = False
) -> aiosmtplib.SMTP:
    """A greeted session; with ``context``, upgraded by STARTTLS (if offered, or else TlsFailure if ``required``)."""
    smtp = aiosmtplib.SMTP(
        hostname=target.ip,
        port=target.port,
        local_hostname=attempt.ehlo_name,
        source_address=(attempt.source_ip, 0) if attempt.source_ip else None,
        timeout=attempt.command_timeout,
        start_tls=False,  # done below, so that SNI names the MX host rather than its IP
    )
    try:
        await smtp.connect(timeout=attempt.connect_timeout)
    except OSError as exc:
        raise DeliveryError(f"{target.host}[{target.ip}]:{target.port}: {exc}", "network") from None
    try:
        await smtp.ehlo()
        if context is not None and smtp.supports_extension("starttls"):
            await _starttls(smtp, target, context)
            await smtp.ehlo()  # RFC 3207 §4.2: what the server offers is learnt again over TLS
        elif required:
            raise TlsFailure("no STARTTLS", offered=False)
    except BaseException:
        smtp.close()
        raise
    return smtp


async def _starttls(smtp: aiosmtplib.SMTP, target: Target, context: ssl.SSLContext) -> None:
    try:
        await smtp.starttls(server_hostname=target.host.strip("[]"), tls_context=context)
    except ssl.SSLCertVerificationError as exc:
        reason = exc.verify_message or exc.reason
        raise TlsFailure(f"certificate verify failed: {reason}", certificate=True) from None
    except aiosmtplib.SMTPResponseException as exc:
        raise TlsFailure(f"refused STARTTLS: {exc.code} {exc.message}") from None
    except (ssl.SSLError, aiosmtplib.SMTPException, OSError) as exc:
        raise TlsFailure(f"TLS handshake failed: {exc}") from None


def _as_error(exc: BaseException, target: Target) -> Exception:
    if isinstance(exc, aiosmtplib.SMTPResponseException):
        return ReplyError(exc.code, exc.message, "connect", target)
    return DeliveryError(f"{target.host}[{target.ip}]:{target.port}: {exc}", "network")


async def _transaction(
    smtp: aiosmtplib.SMTP, attempt: Attempt, target: Target, chunks: ChunkSource, tls: TlsOutcome
) -> SMTPResponse:
    # 8BITMIME declared wherever offered: a body may carry 8-bit text (RFC 6152).
    options = ["BODY=8BITMIME"] if smtp.supports_extension("8bitmime") else []
    if _needs_smtputf8(attempt):
        if not smtp.supports_extension("smtputf8"):
            address = attempt.recipient if not attempt.recipient.isascii() else attempt.mail_from
            raise DeliveryError(
                f"{target.host}[{target.ip}] does not support SMTPUTF8, which the address <{address}> needs",
                "protocol",
                permanent=True,
            )
        options.append("SMTPUTF8")
    stage = "mail"
    try:
        await smtp.mail(attempt.mail_from, options=options, encoding="utf-8")
        stage = "rcpt"
        await smtp.rcpt(attempt.recipient, encoding="utf-8")
        stage = "data"
        return await stream_data(smtp, chunks(), attempt.command_timeout)
    except aiosmtplib.SMTPResponseException as exc:
        raise ReplyError(exc.code, exc.message, stage, target, tls) from None
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
