"""The sender's loop: ask the queue for work, deliver it concurrently, report every outcome.

At most ``connections`` deliveries run at once. The sender asks for as many as it
has free slots; when the queue has nothing ready it waits for a ``msg.queued``
announcement of its zone or one second, whichever comes first. Every outcome is
published to the durable RESULTS stream (retried until NATS takes it, deduplicated
by Nats-Msg-Id); a sender that dies instead leaves its leases to expire, and the
deliveries become ready again.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import AsyncIterator

from nats.aio.msg import Msg
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeout

from zmta_common import local_address
from zmta_common.bus import Bus
from zmta_common.config import Config, PoolAddress, Zone, parse_rate
from zmta_common.events import (
    CLASSIFY_SUBJECT,
    DEFERRED,
    DELIVERED,
    REJECTED,
    Classification,
    ClassifyRequest,
    DeliveryReport,
    LeasedDelivery,
    WorkReply,
    WorkRequest,
    queued_subject,
    ready_subject,
    reported_subject,
    work_subject,
)
from zmta_common.limits import Blacklist, ZoneLimits
from zmta_common.slices import Slice
from zmta_common.store import Store, StoredMessage

from .connections import ConnectionPool
from .errors import DeliveryError
from .mx import MxResolver, Target
from .outgoing import received_header, wire_chunks
from .smtp_client import Attempt, ReplyError, deliver

log = logging.getLogger(__name__)

IDLE_WAIT = 1.0
PREFETCH_CHUNKS = 4  # read with the message row: 1 MiB at most, all of most messages


class Sender:
    def __init__(
        self,
        config: Config,
        zone: str,
        store: Store,
        bus: Bus,
        resolver: MxResolver,
        name: str,
        part: Slice,
        limits: ZoneLimits,
        blacklist: Blacklist,
    ) -> None:
        self.config = config
        self.zone_name = zone
        self.zone: Zone = config.zones[zone]
        self.part = part
        self.pool = part.of(self.zone.pool)  # this process's slice of the zone's pool
        self.limits = limits
        self.blacklist = blacklist
        self.store = store
        self.bus = bus
        self.resolver = resolver
        self.name = name
        interval = 0.0
        if self.zone.throttling:
            count, period = parse_rate(self.zone.throttling)
            interval = period / count
        self.connections = ConnectionPool(limits, interval)
        self._in_flight: set[asyncio.Task[None]] = set()
        self._wake = asyncio.Event()

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    async def run(self, stop: asyncio.Event) -> None:
        async def on_queued(_: Msg) -> None:
            self._wake.set()

        subs = [
            await self.bus.nc.subscribe(queued_subject(self.zone_name), cb=on_queued),
            await self.bus.nc.subscribe(ready_subject(self.zone_name), cb=on_queued),
        ]
        upkeep = asyncio.create_task(self.connections.run(stop), name="connection-upkeep")
        try:
            while not stop.is_set():
                free = self.zone.connections - len(self._in_flight)
                got = await self._take_work(free) if free > 0 else 0
                if free > 0 and got == free:
                    continue  # there may be more ready
                self._wake.clear()
                await self._wait_for_wake_or_slot(stop)
        finally:
            for sub in subs:
                await sub.unsubscribe()
            # Let deliveries in flight finish; their leases would otherwise have to expire.
            if self._in_flight:
                await asyncio.wait(self._in_flight, timeout=self.zone.command_timeout)
            upkeep.cancel()
            await self.connections.close_all()

    async def _wait_for_wake_or_slot(self, stop: asyncio.Event) -> None:
        waiters = [asyncio.ensure_future(self._wake.wait()), asyncio.ensure_future(stop.wait())]
        pending = set(waiters) | set(self._in_flight)
        await asyncio.wait(pending, timeout=IDLE_WAIT, return_when=asyncio.FIRST_COMPLETED)
        for waiter in waiters:
            waiter.cancel()

    async def _take_work(self, free: int) -> int:
        request = WorkRequest(
            zone=self.zone_name, sender=self.name, max=free, slice_index=self.part.index, slice_count=self.part.count
        )
        try:
            reply = await self.bus.nc.request(work_subject(self.zone_name), request.encode(), timeout=5)
        except (NatsTimeout, NoRespondersError):
            return 0  # no queue service answering right now
        except Exception as exc:  # NATS reconnecting
            log.warning("work request failed", extra={"zone": self.zone_name, "error": repr(exc)})
            return 0
        deliveries = WorkReply.decode(reply.data).deliveries
        for delivery in deliveries:
            task = asyncio.create_task(self._deliver(delivery), name=f"deliver:{delivery.id}.{delivery.seq}")
            self._in_flight.add(task)
            task.add_done_callback(self._in_flight.discard)
        return len(deliveries)

    async def _deliver(self, delivery: LeasedDelivery) -> None:
        started = time.time()
        try:
            report = await self._attempt(delivery)
        except Exception as exc:  # a bug must not lose the delivery: defer it
            log.exception("delivery crashed", extra={"id": delivery.id, "seq": delivery.seq})
            report = self._report(delivery, DEFERRED, f"451 4.3.0 Internal error: {exc!r}", "other")
        if report is None:
            return
        report.time = started
        await self._publish(report)

    async def _attempt(self, delivery: LeasedDelivery) -> DeliveryReport | None:
        message = await self.store.get_message(delivery.id, prefetch=PREFETCH_CHUNKS)
        if message is None:
            log.info("message gone", extra={"id": delivery.id, "seq": delivery.seq, "zone": self.zone_name})
            return None
        local = await self._local_address(delivery)
        if self.pool and local is None:
            return self._report(
                delivery,
                DEFERRED,
                f"451 4.7.1 Every local address of this sender is blacklisted or disabled for {delivery.domain}",
                "blacklisted",
            )
        try:
            targets = await self._targets(delivery.domain)
            local, targets = self._same_family(local, targets, delivery)
            ehlo_name = local.name if local else self.config.hostname
            attempt = Attempt(
                mail_from=delivery.mail_from,
                recipient=delivery.recipient,
                ehlo_name=ehlo_name,
                source_ip=local.address if local else None,
                connect_timeout=self.zone.connect_timeout,
                command_timeout=self.zone.command_timeout,
            )
            group = None if self.zone.smarthost else self.zone.mx_group(targets[0].host)
            chunks = functools.partial(self._chunks, message, delivery, ehlo_name)
            accepted = await deliver(attempt, targets, chunks, self.connections, group)
        except DeliveryError as exc:
            status = REJECTED if exc.permanent else DEFERRED
            return self._report(delivery, status, str(exc), exc.category, local_ip=local.address if local else None)
        except ReplyError as exc:
            return await self._refused(delivery, exc, attempt.source_ip)
        return self._report(delivery, DELIVERED, accepted.response, "", accepted.target.host, attempt.source_ip)

    async def _refused(self, delivery: LeasedDelivery, exc: ReplyError, source_ip: str | None) -> DeliveryReport:
        """A server's refusal: classified; a listed local address is left alone for a while."""
        verdict = await self._classify(exc)
        if verdict.action == "blacklist" and source_ip:
            await self.blacklist.mark(delivery.domain, source_ip, self.config.bounce.blacklist_ttl)
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
        return self._report(delivery, status, f"{exc.code} {exc.text}", verdict.category, exc.target.host, source_ip)

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

    def _same_family(
        self, local: PoolAddress | None, targets: list[Target], delivery: LeasedDelivery
    ) -> tuple[PoolAddress | None, list[Target]]:
        """Targets of the local address's IP version; another address of ours if that version has none."""
        if local is None:
            return local, targets
        v6 = ":" in local.address
        same = [t for t in targets if (":" in t.ip) == v6]
        if same:
            return local, same
        others = [a for a in self.pool if (":" in a.address) != v6]
        other = local_address.choose(others, f"{delivery.id}.{delivery.seq}", ipv6=True)
        if other is None:
            version = "IPv6" if not v6 else "IPv4"
            raise DeliveryError(f"the mail servers of {delivery.domain} have only {version} addresses", "network")
        return other, [t for t in targets if (":" in t.ip) != v6]

    async def _targets(self, domain: str) -> list[Target]:
        if self.zone.smarthost:
            host, _, port = self.zone.smarthost.rpartition(":")
            return [Target(host, host.strip("[]"), int(port))]
        return await self.resolver.targets(domain, self.zone.mx_port, ipv6=not self.zone.ignore_ipv6)

    async def _chunks(self, message: StoredMessage, delivery: LeasedDelivery, ehlo_name: str) -> AsyncIterator[bytes]:
        received = received_header(
            message.meta, f"{delivery.id}.{delivery.seq}", delivery.recipient, ehlo_name, self.config.name
        )
        async for chunk in wire_chunks(received + message.headers, self.store.body(message, PREFETCH_CHUNKS)):
            yield chunk

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

    def _report(
        self,
        delivery: LeasedDelivery,
        status: str,
        response: str,
        category: str,
        mx: str = "",
        local_ip: str | None = None,
    ) -> DeliveryReport:
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
        )

    async def _publish(self, report: DeliveryReport) -> None:
        """Put the report on the durable stream; keep trying while the lease is ours."""
        msg_id = f"{report.id}:{report.seq}:{report.lease_token}"
        delay = 0.2
        while True:
            try:
                await self.bus.js.publish(
                    reported_subject(self.zone_name), report.encode(), headers={"Nats-Msg-Id": msg_id}
                )
                log.info(
                    report.status,
                    extra={
                        "id": report.id,
                        "seq": report.seq,
                        "zone": self.zone_name,
                        "mx": report.mx,
                        "local_address": report.local_address,
                        "response": report.response,
                    },
                )
                return
            except Exception as exc:  # NATS down: the result must not be lost
                log.warning("report not yet published", extra={"id": report.id, "error": repr(exc)})
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
