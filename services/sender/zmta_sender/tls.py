"""TLS of outbound SMTP sessions: what a delivery demands, the SSL contexts, what it got.

A delivery's :class:`TlsPolicy` comes from its zone's ``tls`` mode (``zones.<name>.tls``,
overridden per recipient domain by ``zones.<name>.domains.<domain>.tls``), and becomes
``required`` for the MX hosts of a domain whose MTA-STS policy is in ``enforce`` mode:

``none``
    never STARTTLS.
``opportunistic``
    STARTTLS when offered. The certificate is checked but need not pass: a session whose
    certificate does not verify is opened again without the check (and the server is
    remembered for a while, so that its next sessions skip the checked try). A failed
    handshake is retried once in plain text, as the original does.
``required``
    STARTTLS must be offered and the certificate must verify, chain (system CAs plus
    ``tls.ca_file``) and name (the MX host); otherwise the delivery is deferred.

An MX host with DANE TLSA records (:mod:`.dane`, in :attr:`TlsPolicy.dane`) is held to them
instead, whatever the mode: STARTTLS required, the certificate checked against the records.

Every session's outcome (:class:`TlsOutcome`) goes on the delivery report and into the
``zonemta_delivery_tls`` metric; with TLS reporting on, the sessions under a domain's MTA-STS
policy or DANE records are counted for its daily report as well (:mod:`.tlsrpt`).
"""

from __future__ import annotations

import ssl
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from zmta_common import metrics
from zmta_common.config import TlsMode

from .smtp_session import SmtpSession

if TYPE_CHECKING:
    from .dane import HostDane
    from .mta_sts import StsPolicy
    from .tlsrpt import Recorder

NONE: TlsMode = "none"
OPPORTUNISTIC: TlsMode = "opportunistic"
REQUIRED: TlsMode = "required"

UNVERIFIABLE_TTL = 3600.0  # how long a server whose certificate failed is not checked again
UNVERIFIABLE_MAX = 10000

delivery_tls = metrics.Tally(
    "zonemta_delivery_tls",
    'Deliveries that reached a server, by the TLS of their SMTP session (version "none": plain text)',
    ("version", "verified", "zone"),
)


def verifying_context(ca_file: str | None) -> ssl.SSLContext:
    """A client context that checks chain and host name: the system's CAs, plus ``ca_file``; TLS 1.2 or later."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    if ca_file:
        context.load_verify_locations(cafile=ca_file)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


def unverified_context() -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


class TlsContexts:
    """The process's client contexts, built once, and the servers whose certificates failed lately;
    ``reporter``: the process's TLS reporting counts (None: TLS reporting off)."""

    def __init__(self, ca_file: str | None, reporter: Recorder | None = None) -> None:
        self.verifying = verifying_context(ca_file)
        self.unverified = unverified_context()
        self.reporter = reporter
        self._unverifiable: dict[str, tuple[float, str, str]] = {}  # server -> until, result type, reason

    def unverifiable(self, server: str) -> bool:
        found = self._unverifiable.get(server)
        return found is not None and found[0] > time.monotonic()

    def unverifiable_why(self, server: str) -> tuple[str, str]:
        """Why the server's certificate failed: its RFC 8460 result type and the reason ("" if unknown)."""
        _, result, reason = self._unverifiable.get(server, (0.0, "", ""))
        return result, reason

    def remember_unverifiable(self, server: str, result: str = "", reason: str = "") -> None:
        if len(self._unverifiable) >= UNVERIFIABLE_MAX:
            self._unverifiable.clear()
        self._unverifiable[server] = (time.monotonic() + UNVERIFIABLE_TTL, result, reason)


@dataclass(frozen=True, slots=True)
class TlsPolicy:
    """What one delivery demands; ``source`` names who demands it, for the deferral reason;
    ``dane``: the MX hosts with DANE TLSA records, by name, which are held to those instead;
    ``sts``: the domain's MTA-STS policy in ``enforce`` or ``testing`` mode, which its sessions
    are reported under (TLS reporting; it changes nothing a delivery demands, nor equality)."""

    mode: TlsMode
    contexts: TlsContexts
    source: str = "policy"
    dane: Mapping[str, HostDane] = field(default_factory=dict)
    sts: StsPolicy | None = field(default=None, compare=False)

    def satisfied_by(self, outcome: TlsOutcome, host: str = "") -> bool:
        """Whether a session to ``host`` that got ``outcome`` (a parked one) meets the policy."""
        if host in self.dane:
            return bool(outcome.dane)  # opened under DANE, and it passed
        return outcome.verified if self.mode == REQUIRED else True


@dataclass(frozen=True, slots=True)
class TlsOutcome:
    """What a session negotiated; version "none" is plain text. ``dane``: how DANE authenticated
    the server ("DANE-EE", "DANE-TA"), or "unusable" for TLS its unusable TLSA records demanded."""

    version: str = "none"
    cipher: str = ""
    verified: bool = False
    dane: str = ""

    def __str__(self) -> str:
        if self.version == "none":
            return "none"
        text = f"version={self.version} cipher={self.cipher} verified={'yes' if self.verified else 'no'}"
        return f"{text} dane={self.dane}" if self.dane else text

    def count(self, zone: str) -> None:
        delivery_tls.inc(version=self.version, verified="yes" if self.verified else "no", zone=zone)


def outcome(session: SmtpSession) -> TlsOutcome:
    """The TLS state of a connected session."""
    ssl_object = session.ssl_object
    if ssl_object is None:
        return TlsOutcome()
    cipher = ssl_object.cipher()
    return TlsOutcome(
        version=ssl_object.version() or "unknown",
        cipher=cipher[0] if cipher else "",
        verified=ssl_object.context.verify_mode == ssl.CERT_REQUIRED or session.dane.startswith("DANE-"),
        dane=session.dane,
    )
