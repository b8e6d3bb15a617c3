"""One delivery attempt: from a leased delivery and its stored message to a report.

The plugin hooks of the sender (``sender:fetch``, ``sender:headers``, ``sender:connect``,
``sender:delivered``), HTTP delivery for domains with an ``http_url``, the local address
(the one the queue assigned, else one of this sender's slice the domain takes), the MX
targets, the domain's site and their TLS policy (zone, domain, DANE, MTA-STS), our Received
header and the DKIM signatures, the SMTP transaction over a pooled connection, and what a
refusal means (the classifier's verdict; a listed local address is left alone for a while;
traffic shaping reads every refusal and connection failure). The work
loop that leases deliveries and reports their outcomes is :mod:`.worker`.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import AsyncIterator

import httpx

from zmta_common import local_address
from zmta_common.bus import Bus
from zmta_common.config import Config, PoolAddress, parse_rate
from zmta_common.events import (
    CLASSIFY_SUBJECT,
    DEFERRED,
    DELIVERED,
    REJECTED,
    Classification,
    ClassifyRequest,
    DeliveryReport,
    LeasedDelivery,
)
from zmta_common.headers import HeaderBlock, without_bare_line_ends
from zmta_common.hooks import Hooks, Reject
from zmta_common.limits import Blacklist, ZoneLimits
from zmta_common.shaping import Shaper, Signal
from zmta_common.store import Store, StoredMessage

from . import http_delivery
from .connections import ConnectionPool
from .context import DeliveryContext
from .dane import Dane, with_sts
from .errors import DeliveryError
from .mta_sts import MtaSts
from .mta_sts import apply as apply_sts
from .mx import MxResolver, Target
from .outgoing import received_header, wire_chunks
from .signing import Signer
from .smtp_client import Attempt, ReplyError, deliver
from .tls import NONE, TlsContexts, TlsOutcome, TlsPolicy
from .tlsrpt import Recorder

log = logging.getLogger(__name__)

PREFETCH_CHUNKS = 1  # read with the message row: 1 MiB at most (one chunk), all of most messages


class Unread:
    """A message not read with its batch: the delivery reads it itself."""


UNREAD = Unread()


def same_family(
    local: PoolAddress | None, targets: list[Target], pool: list[PoolAddress], key: str, domain: str
) -> tuple[PoolAddress | None, list[Target]]:
    """The local address and the MX targets of one IP version, for the delivery ``key``
    (``<id>.<seq>``) to ``domain``.

    No local address (the operating system picks): every target, as they are. Else the
    targets of the local address's version, in their order; when there are none, an address
    of the other version from ``pool`` (chosen for ``key`` as :func:`local_address.choose`
    does) with the targets of that version. :class:`DeliveryError` (``network``) when the
    pool has no such address either.
    """
    if local is None:
        return local, targets
    v6 = ":" in local.address
    same = [t for t in targets if (":" in t.ip) == v6]
    if same:
        return local, same
    others = [a for a in pool if (":" in a.address) != v6]
    other = local_address.choose(others, key, ipv6=True)
    if other is None:
        version = "IPv6" if not v6 else "IPv4"
        raise DeliveryError(f"the mail servers of {domain} have only {version} addresses", "network")
    return other, [t for t in targets if (":" in t.ip) != v6]


class Deliverer:
    """Makes delivery attempts for one zone, from this sender's slice of its pool."""

    def __init__(
        self,
        config: Config,
        zone: str,
        pool: list[PoolAddress],
        store: Store,
        bus: Bus,
        resolver: MxResolver,
        limits: ZoneLimits,
        blacklist: Blacklist,
        signer: Signer | None = None,
        hooks: Hooks | None = None,
        sts: MtaSts | None = None,
        shaper: Shaper | None = None,
        dane: Dane | None = None,
        tlsrpt: Recorder | None = None,
    ) -> None:
        self.config = config
        self.zone_name = zone
        self.zone = config.zones[zone]
        self.pool = pool
        self.store = store
        self.bus = bus
        self.resolver = resolver
        interval = 0.0
        if self.zone.throttling:  # at most so many messages over one connection
            count, period = parse_rate(self.zone.throttling)
            interval = period / count
        self.connections = ConnectionPool(limits, interval, slot_ttl=self.zone.slot_ttl)
        self.blacklist = blacklist
        self.signer = signer
        self.hooks = hooks or Hooks()
        self.sts = sts  # None: MTA-STS off
        self.shaper = shaper  # None: traffic shaping off
        self.dane = dane  # None: DANE off (no validating resolver)
        self.tls_contexts = TlsContexts(config.tls.ca_file, tlsrpt)  # tlsrpt: TLS reporting's counts, or None
        self.http = httpx.AsyncClient(timeout=self.zone.command_timeout)

    async def close(self) -> None:
        await self.http.aclose()
        if self.sts is not None:
            await self.sts.close()

    async def attempt(self, delivery: LeasedDelivery, message: StoredMessage | Unread | None) -> DeliveryReport | None:
        if isinstance(message, Unread):
            message = await self.store.get_message(delivery.id, prefetch=PREFETCH_CHUNKS)
        if message is None:
            log.info("message gone", extra={"id": delivery.id, "seq": delivery.seq, "zone": self.zone_name})
            return None
        context = self._context(delivery, message)
        try:
            await self.hooks.run("sender:fetch", context)
        except Reject as exc:
            return self.report(delivery, DEFERRED if exc.temporary else REJECTED, exc.reply, "plugin")
        if context.http_url:
            return await self._post(delivery, context, message)
        local = await self._local_address(delivery)
        if self.pool and local is None:
            return self.report(
                delivery,
                DEFERRED,
                f"451 4.7.1 Every local address of this sender is blacklisted or disabled for {delivery.domain}",
                "blacklisted",
            )
        site: str | None = None
        try:
            targets, site = await self._targets(delivery.domain)
            tls, targets = await self._tls(delivery.domain, targets)
            local, targets = same_family(local, targets, self.pool, f"{delivery.id}.{delivery.seq}", delivery.domain)
            ehlo_name = local.name if local else self.config.hostname
            head = await self._head(message, context, ehlo_name)
            attempt = Attempt(
                mail_from=delivery.mail_from,
                recipient=delivery.recipient,
                ehlo_name=ehlo_name,
                source_ip=local.address if local else None,
                connect_timeout=self.zone.connect_timeout,
                command_timeout=self.zone.command_timeout,
                tls=tls,
                size=len(head) + 2 + message.body_size,  # as wire_chunks sends it, less the dot-stuffing
            )
            await self.hooks.run("sender:connect", context, targets[0].host)
            chunks = functools.partial(self._chunks, head, message)
            accepted = await deliver(attempt, targets, chunks, self.connections, site)
        except DeliveryError as exc:
            status = REJECTED if exc.permanent else DEFERRED
            await self._shape(Signal(0, str(exc), exc.category, site, local.address if local else None))
            return self.report(delivery, status, str(exc), exc.category, local_ip=local.address if local else None)
        except ReplyError as exc:
            return await self._refused(delivery, exc, attempt.source_ip, site)
        except Reject as exc:
            return self.report(delivery, DEFERRED if exc.temporary else REJECTED, exc.reply, "plugin")
        await self._delivered_hook(context, accepted.response)
        if self.shaper is not None:
            self.shaper.delivered(site)
        return self.report(
            delivery,
            DELIVERED,
            accepted.response,
            "",
            accepted.target.host,
            attempt.source_ip,
            accepted.tls,
            accepted.target.ip,
        )

    def _context(self, delivery: LeasedDelivery, message: StoredMessage) -> DeliveryContext:
        return DeliveryContext(
            id=delivery.id,
            seq=delivery.seq,
            zone=self.zone_name,
            recipient=delivery.recipient,
            domain=delivery.domain,
            mail_from=delivery.mail_from,
            meta=message.meta,
            http_url=self.zone.domain_policy(delivery.domain).http_url,
        )

    async def _post(self, delivery: LeasedDelivery, context: DeliveryContext, message: StoredMessage) -> DeliveryReport:
        """HTTP delivery: 2xx delivered, 5xx rejected, anything else deferred."""
        head = await self._head(message, context, self.config.hostname)
        outcome = await http_delivery.post(self.http, context, self._raw(head, message))
        if outcome.delivered:
            await self._delivered_hook(context, outcome.response)
            return self.report(delivery, DELIVERED, outcome.response, "", context.http_url or "")
        status = REJECTED if outcome.rejected else DEFERRED
        return self.report(delivery, status, outcome.response, "http", context.http_url or "")

    async def _delivered_hook(self, context: DeliveryContext, response: str) -> None:
        try:
            await self.hooks.run("sender:delivered", context, response)
        except Reject as exc:  # the mail is delivered whatever a plugin thinks of it now
            log.warning("sender:delivered plugin failed", extra={"id": context.id, "error": exc.reply})

    async def _head(self, message: StoredMessage, context: DeliveryContext, ehlo_name: str) -> bytes:
        """Our Received header, then the DKIM signatures, then the message's own headers
        (as ``sender:headers`` plugins leave them)."""
        headers = message.headers
        if self.hooks.has("sender:headers"):
            block = HeaderBlock.parse(headers)
            await self.hooks.run("sender:headers", context, block)
            headers = block.to_bytes()
        signatures = self.signer.signatures(headers, message.meta) if self.signer else b""
        received = received_header(
            message.meta, f"{context.id}.{context.seq}", context.recipient, ehlo_name, self.config.name
        )
        # The stored headers came through the intake's line-end normalisation, but a plugin
        # may have written anything: no bare CR or LF leaves here, whatever its source.
        return without_bare_line_ends(received + signatures + headers)

    async def _raw(self, head: bytes, message: StoredMessage) -> AsyncIterator[bytes]:
        """The message as it is delivered, without SMTP's dot-stuffing."""
        yield head + b"\r\n"
        async for chunk in self.store.body(message, PREFETCH_CHUNKS):
            yield chunk

    async def _refused(
        self, delivery: LeasedDelivery, exc: ReplyError, source_ip: str | None, site: str | None
    ) -> DeliveryReport:
        """A server's refusal: classified; a listed local address is left alone for a while;
        a site that pushes back slows the zone down (traffic shaping)."""
        verdict = await self._classify(exc)
        await self._shape(Signal(exc.code, exc.text, verdict.category, site, source_ip))
        if verdict.action == "blacklist" and source_ip:
            await self.blacklist.mark(
                delivery.domain,
                source_ip,
                self.config.bounce.blacklist_ttl,
                id=delivery.id,
                seq=delivery.seq,
                response=str(exc),
            )
            log.warning(
                "local address blacklisted",
                extra={
                    "id": delivery.id,
                    "seq": delivery.seq,
                    "zone": self.zone_name,
                    "domain": delivery.domain,
                    "local_address": source_ip,
                    "response": str(exc),
                },
            )
        status = REJECTED if verdict.action == "reject" else DEFERRED
        return self.report(
            delivery,
            status,
            f"{exc.code} {exc.text}",
            verdict.category,
            exc.target.host,
            source_ip,
            exc.tls,
            exc.target.ip,
        )

    async def _local_address(self, delivery: LeasedDelivery) -> PoolAddress | None:
        """The address the queue assigned, if it is ours; else one of our slice that the domain takes."""
        assigned = next((a for a in self.pool if a.address == delivery.local_address), None)
        if assigned is not None or not self.pool:
            return assigned
        policy = self.zone.domain_policy(delivery.domain)
        excluded = set(policy.disabled_addresses)
        excluded |= await self.blacklist.listed(delivery.domain, [a.address for a in self.pool])
        usable = [a for a in self.pool if a.address not in excluded]
        return local_address.choose(usable, f"{delivery.id}.{delivery.seq}", ipv6=not self.zone.ignore_ipv6)

    async def _targets(self, domain: str) -> tuple[list[Target], str | None]:
        """The addresses to try, and the domain's site (none for a smarthost)."""
        if self.zone.smarthost:
            host, _, port = self.zone.smarthost.rpartition(":")
            return [Target(host, host.strip("[]"), int(port))], None
        route = await self.resolver.route(domain, self.zone.mx_port, ipv6=not self.zone.ignore_ipv6)
        return route.targets, self.zone.site_of(route.hosts)

    async def _tls(self, domain: str, targets: list[Target]) -> tuple[TlsPolicy, list[Target]]:
        """The delivery's TLS policy (zone and domain ``tls``, DANE, MTA-STS) and the MX targets it
        allows. DANE first: it takes precedence over MTA-STS for the hosts it covers."""
        tls = TlsPolicy(self.zone.tls_mode(domain), self.tls_contexts)
        if tls.mode == NONE or self.zone.smarthost:
            return tls, targets
        if self.dane is not None and self.dane.wanted(self.zone, domain):
            tls, targets = await self.dane.apply(domain, tls, targets)
        if self.sts is None or all(t.host in tls.dane for t in targets):
            return tls, targets
        policy = await self.sts.policy(domain)
        return with_sts(policy, domain, tls, targets) if tls.dane else apply_sts(policy, domain, tls, targets)

    async def _chunks(self, head: bytes, message: StoredMessage) -> AsyncIterator[bytes]:
        async for chunk in wire_chunks(head, self.store.body(message, PREFETCH_CHUNKS)):
            yield chunk

    async def _shape(self, signal: Signal) -> None:
        if self.shaper is None or self.zone.smarthost:
            return
        try:
            await self.shaper.observe(signal)
        except Exception as exc:  # Redis down: the configured limits hold as they are
            log.warning("shaping failed", extra={"zone": self.zone_name, "error": repr(exc)})

    async def _classify(self, exc: ReplyError) -> Classification:
        request = ClassifyRequest(code=exc.code, text=exc.text, stage=exc.stage)
        try:
            reply = await self.bus.nc.request(
                CLASSIFY_SUBJECT, request.encode(), timeout=self.config.bounce.classify_timeout
            )
            return Classification.decode(reply.data)
        except Exception as exc2:  # no classifier in time: a retry is always safe
            log.warning("classifier unavailable", extra={"error": repr(exc2)})
            return Classification(action="defer", category="other", message="classifier unavailable")

    def report(
        self,
        delivery: LeasedDelivery,
        status: str,
        response: str,
        category: str,
        mx: str = "",
        local_ip: str | None = None,
        tls: TlsOutcome | None = None,
        mx_ip: str = "",
    ) -> DeliveryReport:
        if tls is not None:
            tls.count(self.zone_name)
        return DeliveryReport(
            id=delivery.id,
            seq=delivery.seq,
            zone=self.zone_name,
            lease_token=delivery.lease_token,
            status=status,
            response=response,
            category=category,
            mx=mx,
            local_address=local_ip or "",
            tls=str(tls) if tls is not None else "",
            mx_ip=mx_ip,
        )
