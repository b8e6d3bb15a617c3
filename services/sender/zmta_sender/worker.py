"""The sender's work loop: ask the queue for work, deliver it concurrently (each attempt
is :class:`.delivery.Deliverer`'s), report every outcome.

At most ``connections`` deliveries run at once. The sender asks for as many as it
has free slots; when the queue has nothing ready it waits for a ``msg.queued``
announcement of its zone or one second, whichever comes first. Every outcome is
published to the durable RESULTS stream (retried until NATS takes it, deduplicated
by Nats-Msg-Id); a sender that dies instead leaves its leases to expire, and the
deliveries become ready again.

On stop (SIGTERM) a sender asks for no more work and lets its deliveries in flight
finish within a grace period; those that cannot finish in time are cancelled and their
leases given back at once (the rows are ready again for the zone's other senders), so
the process exits within the grace period and no delivery waits for a lease to expire.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from nats.aio.msg import Msg
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeout
from redis.exceptions import RedisError

from zmta_common.bus import Bus
from zmta_common.config import Config, Zone
from zmta_common.events import (
    DEFERRED,
    DeliveryReport,
    LeasedDelivery,
    WorkReady,
    WorkReply,
    WorkRequest,
    queued_subject,
    ready_subject,
    reported_subject,
    work_subject,
)
from zmta_common.limits import ZoneLimits
from zmta_common.slices import Slice
from zmta_common.store import DeliveryKey, LeaseRef, Store, StoredMessage

from .delivery import PREFETCH_CHUNKS, UNREAD, Deliverer, Unread

log = logging.getLogger(__name__)

IDLE_WAIT = 1.0
MIN_WAIT = 0.01  # the shortest wait for a domain's room, so a hint of 0.0001 s is not a busy loop
# On stop: the part of the grace period (at most) kept for giving back unfinished leases.
RELEASE_RESERVE = 5.0


class Sender:
    def __init__(
        self,
        config: Config,
        zone: str,
        store: Store,
        bus: Bus,
        name: str,
        part: Slice,
        limits: ZoneLimits,
        deliverer: Deliverer,
    ) -> None:
        self.config = config
        self.zone_name = zone
        self.zone: Zone = config.zones[zone]
        self.part = part
        self.limits = limits
        self.store = store
        self.bus = bus
        self.name = name
        self.deliverer = deliverer
        self.connections = deliverer.connections
        self._in_flight: set[asyncio.Task[None]] = set()
        # Deliveries whose outcome is not known yet, by task: the leases to give back on stop.
        self._unreported: dict[asyncio.Task[None], LeasedDelivery] = {}
        # Deliveries whose outcome is known and whose report is not on the stream yet (NATS
        # may be down): their leases are renewed too, or another sender would send them again.
        self._publishing: dict[asyncio.Task[None], LeasedDelivery] = {}
        self._wake = asyncio.Event()

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    async def run(self, stop: asyncio.Event, grace: float | None = None) -> None:
        """Deliver until ``stop`` is set, then finish or give back the deliveries in flight
        within ``grace`` seconds (default: the zone's ``command_timeout``)."""

        async def on_queued(_: Msg) -> None:
            self._wake.set()

        subs = [
            await self.bus.nc.subscribe(queued_subject(self.zone_name), cb=on_queued),
            await self.bus.nc.subscribe(ready_subject(self.zone_name), cb=on_queued),
        ]
        # The connections' slots are renewed until the deliveries in flight are done, after stop too.
        upkeep_stop = asyncio.Event()
        upkeep = asyncio.create_task(self.connections.run(upkeep_stop), name="connection-upkeep")
        renewal = asyncio.create_task(self._keep_leases(upkeep_stop), name="lease-renewal")
        shaper = self.deliverer.shaper
        recovery = asyncio.create_task(shaper.run(upkeep_stop), name="shaping-recovery") if shaper else None
        try:
            while not stop.is_set():
                free = self.zone.connections - len(self._in_flight)
                got, retry_in = await self._take_work(free) if free > 0 else (0, 0.0)
                if free > 0 and got == free:
                    continue  # there may be more ready
                self._wake.clear()
                await self._wait_for_wake_or_slot(stop, retry_in)
        finally:
            for sub in subs:
                await sub.unsubscribe()
            await self._drain(self.zone.command_timeout if grace is None else grace)
            upkeep_stop.set()
            upkeep.cancel()
            renewal.cancel()
            if recovery is not None:
                recovery.cancel()
            await self.connections.close_all()
            await self.deliverer.close()

    async def _drain(self, grace: float) -> None:
        """Let deliveries in flight finish within ``grace`` seconds; cancel the rest and give
        their leases back, so that other senders take them at once."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        if self._in_flight:
            log.info(
                "finishing deliveries in flight",
                extra={"zone": self.zone_name, "count": len(self._in_flight), "grace": grace},
            )
            finish_by = deadline - min(RELEASE_RESERVE, grace / 3)
            await asyncio.wait(set(self._in_flight), timeout=max(0.0, finish_by - loop.time()))
        # Without an outcome yet: cancelled now (a cancelled delivery never reports), so its
        # lease can go back. Deliveries whose outcome is known are still publishing it: awaited.
        unfinished = dict(self._unreported)
        self._unreported.clear()
        for task in unfinished:
            task.cancel()
        if unfinished:
            await self._release(list(unfinished.values()))
        if self._in_flight:
            await asyncio.wait(set(self._in_flight), timeout=max(0.1, deadline - loop.time()))

    async def _keep_leases(self, stop: asyncio.Event) -> None:
        """Renew the leases of the deliveries in flight a few times per lease time, so that a
        slow delivery (a huge message, a slow server) is not handed to a second sender."""
        lease_time = self.config.queue.lease_time
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), lease_time / 3)
            deliveries = [*self._unreported.values(), *self._publishing.values()]
            try:
                # The domain-limit places too, or the delivery would stop counting against its limit.
                await self.limits.renew([f"{d.id}.{d.seq}" for d in deliveries], time.time() + lease_time)
            except Exception as exc:  # Redis is down: the places may run out (the leases must not)
                log.warning("in-flight places not renewed", extra={"zone": self.zone_name, "error": repr(exc)})
            try:
                await self.store.renew_leases([LeaseRef(d.id, d.seq, d.lease_token) for d in deliveries], lease_time)
            except Exception as exc:  # the store is down: leases may expire, as after a crash
                log.warning("leases not renewed", extra={"zone": self.zone_name, "error": repr(exc)})

    async def _release(self, deliveries: list[LeasedDelivery]) -> None:
        """Give back leases this sender will not finish: their in-flight places in Redis first
        (nobody can lease the rows while the store still says they are leased), then the rows."""
        members = [f"{d.id}.{d.seq}" for d in deliveries]
        try:
            await self.limits.release(members)
        except Exception as exc:  # Redis down: the places free themselves at lease expiry
            log.warning("in-flight places not released", extra={"zone": self.zone_name, "error": repr(exc)})
        try:
            released = await self.store.release_leases([LeaseRef(d.id, d.seq, d.lease_token) for d in deliveries])
        except Exception as exc:  # the store is down: the leases expire as after a crash
            log.warning("leases not released", extra={"zone": self.zone_name, "error": repr(exc)})
            return
        log.info(
            "leases released",
            extra={"zone": self.zone_name, "count": released, "deliveries": [f"{d.id}.{d.seq}" for d in deliveries]},
        )
        # The zone's other senders may take them now.
        try:
            await self.bus.nc.publish(
                ready_subject(self.zone_name), WorkReady(zone=self.zone_name, finished=released).encode()
            )
        except Exception as exc:  # they ask again within a second anyway
            log.debug("ready not announced", extra={"zone": self.zone_name, "error": repr(exc)})

    async def _wait_for_wake_or_slot(self, stop: asyncio.Event, retry_in: float = 0.0) -> None:
        """Until new work is announced, a delivery ends, or a domain at a limit has room again
        (``retry_in``, the queue's hint); at most :data:`IDLE_WAIT`."""
        waiters = [asyncio.ensure_future(self._wake.wait()), asyncio.ensure_future(stop.wait())]
        pending = set(waiters) | set(self._in_flight)
        timeout = min(IDLE_WAIT, max(MIN_WAIT, retry_in)) if retry_in > 0 else IDLE_WAIT
        await asyncio.wait(pending, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        for waiter in waiters:
            waiter.cancel()

    async def _take_work(self, free: int) -> tuple[int, float]:
        """Ask the queue for up to ``free`` deliveries and start them: how many it gave, and
        its hint of when to ask again."""
        request = WorkRequest(
            zone=self.zone_name, sender=self.name, max=free, slice_index=self.part.index, slice_count=self.part.count
        )
        try:
            reply = await self.bus.nc.request(work_subject(self.zone_name), request.encode(), timeout=5)
        except (NatsTimeout, NoRespondersError):
            return 0, 0.0  # no queue service answering right now
        except Exception as exc:  # NATS reconnecting
            log.warning("work request failed", extra={"zone": self.zone_name, "error": repr(exc)})
            return 0, 0.0
        work = WorkReply.decode(reply.data)
        deliveries = await self._confirm(work.deliveries)
        messages = await self._messages(deliveries)
        for delivery, message in zip(deliveries, messages, strict=True):
            task = asyncio.create_task(self._deliver(delivery, message), name=f"deliver:{delivery.id}.{delivery.seq}")
            self._in_flight.add(task)
            self._unreported[task] = delivery
            task.add_done_callback(self._in_flight.discard)
        return len(deliveries), work.retry_in

    async def _confirm(self, deliveries: list[LeasedDelivery]) -> list[LeasedDelivery]:
        """Extend the short claims the queue leased with to the whole lease; only what is
        still ours is delivered. If the store or Redis cannot be reached, nothing is: the
        claims run out soon and the deliveries are leased again."""
        if not deliveries:
            return []
        lease_time = self.config.queue.lease_time
        try:
            await self.limits.renew([f"{d.id}.{d.seq}" for d in deliveries], time.time() + lease_time)
            ours = await self.store.renew_leases([LeaseRef(d.id, d.seq, d.lease_token) for d in deliveries], lease_time)
        except Exception as exc:
            log.warning("leases not confirmed", extra={"zone": self.zone_name, "error": repr(exc)})
            return []
        return [d for d in deliveries if DeliveryKey(d.id, d.seq) in ours]

    async def _messages(self, deliveries: list[LeasedDelivery]) -> list[StoredMessage | Unread | None]:
        """The messages of a batch of deliveries, read in one query; if that fails, each
        delivery reads its own (and fails as it would have)."""
        if not deliveries:
            return []
        try:
            return list(await self.store.get_messages([d.id for d in deliveries], prefetch=PREFETCH_CHUNKS))
        except Exception as exc:
            log.warning("messages not read", extra={"zone": self.zone_name, "error": repr(exc)})
            return [UNREAD] * len(deliveries)

    async def _deliver(self, delivery: LeasedDelivery, message: StoredMessage | Unread | None) -> None:
        started = time.time()
        task = asyncio.current_task()
        assert task is not None  # (_take_work runs each delivery as a task of its own)
        try:
            report = await self.deliverer.attempt(delivery, message)
        except RedisError as exc:
            # Redis (limits, connection slots, blacklist) is out: no fault of the delivery's,
            # and no attempt. Its lease goes back; the queue leases nothing until Redis is back.
            log.warning("redis unavailable, delivery given back", extra={"id": delivery.id, "error": repr(exc)})
            self._unreported.pop(task, None)
            await self._release([delivery])
            return
        except Exception as exc:  # a bug must not lose the delivery: defer it
            log.exception("delivery crashed", extra={"id": delivery.id, "seq": delivery.seq})
            report = self.deliverer.report(delivery, DEFERRED, f"451 4.3.0 Internal error: {exc!r}", "other")
        # The outcome is known: on stop this delivery is awaited while it reports, never
        # cancelled; its lease is renewed until the report is on the stream.
        self._unreported.pop(task, None)
        if report is None:
            return
        report.time = started
        report.timer_ms = round((time.time() - started) * 1000)
        self._publishing[task] = delivery
        try:
            await self._publish(report)
        finally:
            self._publishing.pop(task, None)

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
                        "tls": report.tls,
                    },
                )
                return
            except Exception as exc:  # NATS down: the result must not be lost
                log.warning("report not yet published", extra={"id": report.id, "error": repr(exc)})
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
