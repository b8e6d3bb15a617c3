"""What an ingest interface decides about a transaction: who may send, senders,
recipients, storing."""

from __future__ import annotations

import asyncio
import inspect
import logging
from dataclasses import dataclass
from ipaddress import ip_network
from typing import TYPE_CHECKING

from aiosmtpd.smtp import Envelope as SmtpEnvelope
from aiosmtpd.smtp import Session
from redis.asyncio import Redis
from redis.exceptions import RedisError

from zmta_common import queueing
from zmta_common.addresses import address_error
from zmta_common.bus import Bus
from zmta_common.config import Config, SmtpInterface
from zmta_common.headers import unsafe_character
from zmta_common.hooks import Hooks, Reject
from zmta_common.intake import Envelope, IntakeError, MessageIntake, too_many_recipients
from zmta_common.limits import AuthFailures
from zmta_common.store import Store

from .auth import MAX_CREDENTIAL, Outcome, make_authenticator
from .client_limits import ClientLimits, parse_ip

if TYPE_CHECKING:
    from .smtp_server import IngestSMTP

log = logging.getLogger(__name__)

AUTH_MECHANISMS = ("PLAIN", "LOGIN")
# A refused AUTH is answered this many seconds late, to slow down password guessing.
AUTH_FAILURE_DELAY = 1.0
STORE_FAILED = "451 4.3.0 Temporary failure while storing the message, try again later"


_AIOSMTPD_NAMES: dict[str, list[str]] = {}


def aiosmtpd_names(cls: type) -> list[str]:
    """The names aiosmtpd looks for on its protocol and its handler (``smtp_*`` commands,
    ``auth_*`` mechanisms, ``handle_*`` hooks), found once per class. aiosmtpd builds its
    tables from ``dir()`` and ``inspect.getmembers()`` on every connection, which reads
    every attribute; ``__dir__`` returning only these makes that cheap."""
    key = f"{cls.__module__}.{cls.__qualname__}"
    if key not in _AIOSMTPD_NAMES:
        prefixes = ("smtp_", "auth_", "handle_")
        _AIOSMTPD_NAMES[key] = sorted({n for klass in cls.__mro__ for n in vars(klass) if n.startswith(prefixes)})
    return _AIOSMTPD_NAMES[key]


def client_ip(session: Session) -> str:
    peer = session.peer
    return str(peer[0]) if isinstance(peer, tuple) else str(peer or "")


@dataclass(slots=True)
class AuthRequest:
    """What ``smtp:auth`` plugins see; one that sets ``accepted`` decides."""

    username: str
    password: str
    interface: str
    client: str
    accepted: bool | None = None


class IngestHandler:
    def __init__(
        self, config: Config, name: str, store: Store, bus: Bus, redis: Redis, hooks: Hooks | None = None
    ) -> None:
        self.config = config
        self.hooks = hooks or Hooks()
        self.name = name
        self.interface: SmtpInterface = config.smtp_interfaces[name]
        self.store = store
        self.bus = bus
        self.relay_networks = [ip_network(n, strict=False) for n in self.interface.relay_networks]
        self.authenticator = make_authenticator(name, self.interface)
        self.clients = ClientLimits(self.interface, self.interface.hostname or config.hostname)
        self.auth_failures = AuthFailures(
            redis, name, self.interface.auth_max_failures, self.interface.auth_failure_window
        )

    def __dir__(self) -> list[str]:
        return aiosmtpd_names(type(self))  # see aiosmtpd_names

    async def close(self) -> None:
        if self.authenticator is not None:
            await self.authenticator.close()

    async def handle_EHLO(
        self, server: IngestSMTP, session: Session, envelope: SmtpEnvelope, hostname: str, responses: list[str]
    ) -> list[str]:
        session.host_name = hostname
        # aiosmtpd's own AUTH line goes: AUTH is ours, and offered only where it may be used.
        lines = [r for r in responses[:-1] if not r.startswith("250-AUTH")]
        if server.auth_offered:
            lines.append("250-AUTH " + " ".join(AUTH_MECHANISMS))
        # aiosmtpd reads pipelined commands in order but does not say so.
        return [*lines, "250-PIPELINING", responses[-1]]

    def trusted(self, session: Session) -> bool:
        """Whether the client is in the interface's relay_networks (may send without AUTH)."""
        ip = parse_ip(client_ip(session))
        return ip is not None and any(ip in network for network in self.relay_networks)

    def check_relay(self, session: Session) -> str | None:
        """At MAIL FROM: the refusal for a client that may not send (yet), if it may not."""
        if session.authenticated or self.trusted(session):
            return None
        ip = client_ip(session)
        if self.authenticator is not None:
            log.info("auth required", extra={"client": ip, "interface": self.name})
            return "530 5.7.0 Authentication required"
        log.info("relay denied", extra={"client": ip, "interface": self.name})
        return f"554 5.7.1 Relaying denied: {ip} is not allowed to send through this server"

    async def authenticate(self, session: Session, mechanism: str, login: bytes, password: bytes) -> str:
        """Check AUTH credentials; mark the session authenticated on success; return the reply."""
        assert self.authenticator is not None
        ip = client_ip(session)
        try:
            username = login.decode()
            secret = password.decode()
        except UnicodeDecodeError:
            username, secret = login.decode(errors="replace"), ""
        fields: dict[str, object] = {"user": username, "client": ip, "interface": self.name, "mechanism": mechanism}
        if await self._locked_out(ip):
            log.warning("auth locked out", extra=fields)
            return f"454 4.7.0 Too many failed authentications from {ip}, try again later"
        if not username or not secret or len(username) > MAX_CREDENTIAL or len(secret) > MAX_CREDENTIAL:
            verdict_reason = "empty, too long or not UTF-8"
            outcome = Outcome.REFUSED
        elif unsafe_character(username) is not None:
            # The user name goes into our Received header and the logs: no line breaks there.
            verdict_reason = "control character in the user name"
            outcome = Outcome.REFUSED
        else:
            outcome, verdict_reason = await self._check(AuthRequest(username, secret, self.name, ip))
        if outcome is Outcome.ACCEPTED:
            session.authenticated = True
            session.auth_data = username  # type: ignore[assignment]  # aiosmtpd types it as None
            log.info("auth accepted", extra=fields)
            return "235 2.7.0 Authentication successful"
        if outcome is Outcome.UNAVAILABLE:
            log.warning("auth unavailable", extra={**fields, "error": verdict_reason})
            return "454 4.7.0 Temporary authentication failure, try again later"
        log.warning("auth refused", extra={**fields, "reason": verdict_reason})
        await self._count_failure(ip)
        await asyncio.sleep(AUTH_FAILURE_DELAY)
        return "535 5.7.8 Authentication credentials invalid"

    async def _locked_out(self, ip: str) -> bool:
        try:
            return await self.auth_failures.locked(ip)
        except RedisError as exc:  # without Redis, AUTH still works (unlimited across pods)
            log.warning("auth failure count unavailable", extra={"client": ip, "error": repr(exc)})
            return False

    async def _count_failure(self, ip: str) -> None:
        try:
            await self.auth_failures.add(ip)
        except RedisError as exc:
            log.warning("auth failure count unavailable", extra={"client": ip, "error": repr(exc)})

    async def _check(self, request: AuthRequest) -> tuple[Outcome, str]:
        """``smtp:auth`` plugins first; when none decides, the interface's users or auth_url."""
        try:
            await self.hooks.run("smtp:auth", request)
        except Reject as exc:
            return (Outcome.UNAVAILABLE if exc.temporary else Outcome.REFUSED), f"plugin: {exc.reply}"
        if request.accepted is not None:
            return (Outcome.ACCEPTED if request.accepted else Outcome.REFUSED), "plugin"
        assert self.authenticator is not None
        verdict = await self.authenticator.check(request.username, request.password)
        return verdict.outcome, verdict.reason

    async def plugins_allow(self, hook: str, envelope: SmtpEnvelope, address: str) -> str | None:
        """The refusal of an ``smtp:mail_from`` / ``smtp:rcpt_to`` plugin, if one refuses."""
        try:
            await self.hooks.run(hook, envelope, address)
        except Reject as exc:
            log.info("refused by a plugin", extra={"hook": hook, "address": address, "reply": exc.reply})
            return exc.reply
        return None

    def check_sender(self, address: str) -> str | None:
        if address and (reason := address_error(address)):
            return f"553 5.1.7 <{address}> is not a valid RFC 5321 address: {reason}"
        return None

    def check_recipient(self, accepted: list[str], address: str) -> str | None:
        if len(accepted) >= self.interface.max_recipients:
            return too_many_recipients(self.interface.max_recipients)
        if not address:
            return "501 5.1.3 Empty recipient address"
        if reason := address_error(address):
            return f"553 5.1.3 <{address}> is not a valid RFC 5321 address: {reason}"
        return None

    def open_intake(
        self, session: Session, envelope: SmtpEnvelope, max_size: int | None, tls: bool = False
    ) -> MessageIntake:
        origin = client_ip(session)
        user = session.auth_data if session.authenticated and isinstance(session.auth_data, str) else None
        # RFC 3848 transmission types: S for TLS, A for an authenticated client.
        transtype = ("ESMTP" + ("S" if tls else "") + ("A" if user else "")) if session.extended_smtp else "SMTP"
        return MessageIntake(
            self.store,
            self.config,
            Envelope(
                mail_from=envelope.mail_from or "",
                recipients=list(envelope.rcpt_tos),
                interface=self.name,
                transtype=transtype,
                origin=origin,
                originhost=f"[{origin}]",
                transhost=session.host_name or "",
                user=user,
                allow_routing_headers=self.interface.allow_routing_headers,
            ),
            max_size or self.interface.max_size,
            self.hooks,
        )

    async def finish(self, intake: MessageIntake) -> str:
        """Queue the received message (:func:`zmta_common.queueing.queue`); the SMTP reply."""
        try:
            queued = await queueing.queue(intake, self.bus)
        except IntakeError as exc:
            return exc.reply
        except Exception:  # the store is down or failed: the client must retry
            return STORE_FAILED
        # A message whose every recipient is suppressed is dropped without a word.
        return f"250 2.0.0 Message queued as {queued.id}"

    def store_failure(self, intake: MessageIntake, exc: BaseException) -> str:
        """The reply for a message whose chunks could not be stored while DATA went on."""
        queueing.store_failed(intake, exc)
        return STORE_FAILED


# aiosmtpd inspects the signature of handle_EHLO on every connection (to tell its two
# forms apart); a signature kept on the function is read instead of being worked out anew.
IngestHandler.handle_EHLO.__signature__ = inspect.signature(IngestHandler.handle_EHLO)  # type: ignore[attr-defined]
