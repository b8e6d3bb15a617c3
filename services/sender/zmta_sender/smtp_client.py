"""One delivery attempt over SMTP (:class:`~.smtp_session.SmtpSession`), the body streamed from the store.

The addresses of the recipient's MX hosts are tried in order until one takes the
transaction. Failing to connect (or a 4xx greeting, or TLS that the delivery's
:class:`~.tls.TlsPolicy` requires and the server does not give) moves on to the next
address; a reply to MAIL, RCPT or DATA ends the attempt, to be classified by the caller.
An MX host with DANE TLSA records gets STARTTLS without a CA check, then its certificate
chain is checked against the records (:mod:`.dane`) before anything else is said.
Connections are reused through a :class:`~.connections.ConnectionPool`. With TLS reporting on,
each new session under a domain's MTA-STS policy or DANE records is counted (:mod:`.tlsrpt`).
"""

from __future__ import annotations

import functools
import logging
import ssl
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from zmta_common.domains import domain_of
from zmta_common.tlsrpt import STARTTLS_NOT_SUPPORTED, TLSA_INVALID, VALIDATION_FAILURE

from . import tlsrpt
from .connections import Connection, ConnectionPool, PoolKey
from .dane import DANE_DEFERRAL, DaneMismatch, HostDane, presented_chain
from .errors import DeliveryError
from .mx import Target
from .smtp_session import Reply, SmtpBroken, SmtpError, SmtpRefused, SmtpSession
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
    """STARTTLS was not offered (``offered`` false), refused, or its handshake failed; ``result``:
    the RFC 8460 result type, ``local_ip``: the address the session came from."""

    def __init__(
        self, detail: str, offered: bool = True, certificate: bool = False, result: str = VALIDATION_FAILURE
    ) -> None:
        super().__init__(detail)
        self.offered = offered
        self.certificate = certificate  # the handshake failed on the certificate check
        self.result = result if offered else STARTTLS_NOT_SUPPORTED
        self.local_ip = ""

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
    size: int | None = None  # of the message, declared (SIZE=) to a server that takes it


@dataclass(slots=True)
class Accepted:
    target: Target
    response: str
    tls: TlsOutcome


ChunkSource = Callable[[], AsyncIterator[bytes]]


async def deliver(
    attempt: Attempt, targets: list[Target], chunks: ChunkSource, pool: ConnectionPool, site: str | None
) -> Accepted:
    """Try the targets in order; return how the message was accepted or raise why not.

    ``site`` is the recipient domain's site (:mod:`zmta_common.sites`), for connection limits.
    """
    last: Exception | None = None
    domain = domain_of(attempt.recipient)
    for target in targets:
        key: PoolKey = (attempt.source_ip, attempt.ehlo_name, target.ip, target.port, domain)
        reused = await pool.take(key)
        if reused is not None and not attempt.tls.satisfied_by(outcome(reused.session), target.host):
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
            conn = await pool.open(domain, site, functools.partial(_connect, attempt, target))
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
        tls = outcome(conn.session)
        response = await _transaction(conn.session, attempt, target, chunks, tls)
    except BaseException:
        await pool.discard(conn)
        raise
    await pool.give(key, conn)
    return Accepted(target, str(response), tls)


async def _connect(attempt: Attempt, target: Target) -> SmtpSession:
    """Connect, greet and STARTTLS as the delivery's TLS policy says."""
    policy = attempt.tls
    try:
        if target.host in policy.dane:
            return await _dane(attempt, target, policy.dane[target.host])
        if policy.mode == NONE:
            return await _open(attempt, target, None)
        if policy.mode == REQUIRED:
            session = await _open(attempt, target, policy.contexts.verifying, required=True)
            _report(attempt, target, session)
            return session
        return await _opportunistic(attempt, target)
    except TlsFailure as exc:
        _report_failure(attempt, target, exc)
        raise exc.deferral(policy, target) from None
    except SmtpRefused as exc:
        raise ReplyError(exc.code, exc.text, "connect", target) from None
    except SmtpBroken as exc:
        raise DeliveryError(f"{target.host}[{target.ip}]:{target.port}: {exc}", "network") from None


async def _opportunistic(attempt: Attempt, target: Target) -> SmtpSession:
    """Verified TLS if the certificate allows, else unverified TLS, else (once) plain text."""
    contexts = attempt.tls.contexts
    server = f"{target.host}[{target.ip}]:{target.port}"
    tries = [contexts.verifying, contexts.unverified]
    if contexts.unverifiable(server):
        tries = tries[1:]
    for context in tries:
        try:
            session = await _open(attempt, target, context)
        except TlsFailure as exc:
            if not exc.certificate:
                log.info("tls failed, retrying without", extra={"mx": server, "error": str(exc)})
                _report_failure(attempt, target, exc)
                break
            contexts.remember_unverifiable(server, exc.result, str(exc))
            continue
        if attempt.tls.sts is not None:  # MTA-STS testing: the session counts, TLS or not
            _report_opportunistic(attempt, target, session, server)
        return session
    return await _open(attempt, target, None)


async def _dane(attempt: Attempt, target: Target, dane: HostDane) -> SmtpSession:
    """STARTTLS required and the certificate checked against the host's TLSA records; else
    DeliveryError (``451 4.7.5 DANE: ...``). Only unusable records: TLS without the check."""
    where = f"{target.host}[{target.ip}]"

    def check(session: SmtpSession) -> None:
        if not dane.usable:
            session.dane = "unusable"
            return
        names = (target.host, domain_of(attempt.recipient))  # the MX host, and the next-hop domain
        chain = presented_chain(session.ssl_object) if session.ssl_object is not None else []
        try:
            session.dane = dane.authenticate(chain, names)
        except DaneMismatch as exc:
            _report(attempt, target, session, exc.result, f"certificate {exc}")
            raise

    try:
        session = await _open(attempt, target, attempt.tls.contexts.unverified, required=True, check=check)
    except DaneMismatch as exc:
        raise DeliveryError(f"{DANE_DEFERRAL} certificate of {where} {exc}", "tls") from None
    except TlsFailure as exc:
        _report_failure(attempt, target, exc)
        if not exc.offered:
            reason = f"{where} does not offer STARTTLS, which its TLSA records require"
            raise DeliveryError(f"{DANE_DEFERRAL} {reason}", "tls") from None
        raise DeliveryError(f"{DANE_DEFERRAL} {where} {exc}", "tls") from None
    if session.dane == "unusable":
        _report(attempt, target, session, TLSA_INVALID, "no usable TLSA record (PKIX usages only)")
    else:
        _report(attempt, target, session)
    return session


def _report(attempt: Attempt, target: Target, session: SmtpSession, result: str = "", reason: str = "") -> None:
    """TLS reporting: a new session under the delivery's policy, successful unless ``result`` says."""
    if attempt.tls.contexts.reporter is not None:
        tlsrpt.observe(attempt.tls, attempt.recipient, target, session.local_ip, result, reason)


def _report_failure(attempt: Attempt, target: Target, exc: TlsFailure) -> None:
    if attempt.tls.contexts.reporter is not None:
        tlsrpt.observe(attempt.tls, attempt.recipient, target, exc.local_ip, exc.result, str(exc))


def _report_opportunistic(attempt: Attempt, target: Target, session: SmtpSession, server: str) -> None:
    """An opportunistic session under an MTA-STS ``testing`` policy: verified TLS, unverified TLS
    (the certificate failed, now or lately), or plain text (no STARTTLS)."""
    if session.ssl_object is None:
        _report(attempt, target, session, STARTTLS_NOT_SUPPORTED, "no STARTTLS")
    elif session.ssl_object.context.verify_mode != ssl.CERT_REQUIRED:
        result, reason = attempt.tls.contexts.unverifiable_why(server)
        _report(attempt, target, session, result or VALIDATION_FAILURE, reason or "certificate not verified")
    else:
        _report(attempt, target, session)


async def _open(
    attempt: Attempt,
    target: Target,
    context: ssl.SSLContext | None,
    required: bool = False,
    check: Callable[[SmtpSession], None] | None = None,
) -> SmtpSession:
    """A greeted session; with ``context``, upgraded by STARTTLS (if offered, or else TlsFailure if
    ``required``). ``check`` judges the session right after the handshake, before anything is said."""
    session = await SmtpSession.connect(
        target.ip,
        target.port,
        source_ip=attempt.source_ip,
        connect_timeout=attempt.connect_timeout,
        command_timeout=attempt.command_timeout,
    )
    try:
        await session.ehlo(attempt.ehlo_name)
        if context is not None and session.supports("STARTTLS"):
            await _starttls(session, target, context)
            if check is not None:
                check(session)
            await session.ehlo(attempt.ehlo_name)  # RFC 3207 §4.2: what the server offers is learnt again over TLS
        elif required:
            raise TlsFailure("no STARTTLS", offered=False)
    except BaseException as exc:
        if isinstance(exc, TlsFailure):
            exc.local_ip = session.local_ip
        session.close()
        raise
    return session


async def _starttls(session: SmtpSession, target: Target, context: ssl.SSLContext) -> None:
    try:
        # SNI and the certificate check name the MX host, not the address connected to.
        await session.starttls(context, server_hostname=target.host.strip("[]"))
    except ssl.SSLCertVerificationError as exc:
        reason = exc.verify_message or exc.reason
        result = tlsrpt.certificate_result(exc.verify_code)
        raise TlsFailure(f"certificate verify failed: {reason}", certificate=True, result=result) from None
    except SmtpRefused as exc:
        raise TlsFailure(f"refused STARTTLS: {exc.code} {exc.text}", result=STARTTLS_NOT_SUPPORTED) from None
    except (SmtpError, OSError) as exc:  # ssl.SSLError is an OSError
        raise TlsFailure(f"TLS handshake failed: {exc}") from None


async def _transaction(
    session: SmtpSession, attempt: Attempt, target: Target, chunks: ChunkSource, tls: TlsOutcome
) -> Reply:
    # 8BITMIME declared wherever offered: a body may carry 8-bit text (RFC 6152).
    options = ["BODY=8BITMIME"] if session.supports("8BITMIME") else []
    if _needs_smtputf8(attempt):
        if not session.supports("SMTPUTF8"):
            address = attempt.recipient if not attempt.recipient.isascii() else attempt.mail_from
            raise DeliveryError(
                f"{target.host}[{target.ip}] does not support SMTPUTF8, which the address <{address}> needs",
                "protocol",
                permanent=True,
            )
        options.append("SMTPUTF8")
    try:
        return await session.send(attempt.mail_from, attempt.recipient, chunks(), options, attempt.size)
    except SmtpRefused as exc:
        raise ReplyError(exc.code, exc.text, exc.stage, target, tls) from None
    except SmtpBroken as exc:
        raise ConnectionBroken(f"{target.host}[{target.ip}] during {exc.stage}: {exc}", exc.stage) from None
    except OSError as exc:  # reading the body from the store, as before: deferred as a network failure
        raise ConnectionBroken(f"{target.host}[{target.ip}] during data: {exc}", "data") from None


def _needs_smtputf8(attempt: Attempt) -> bool:
    return not (attempt.mail_from.isascii() and attempt.recipient.isascii())
