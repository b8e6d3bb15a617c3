"""Garbage collection: bodies nobody will send, deliveries older than their zone allows, and
delivery log entries older than ``delivery_log.retention_days``.

A delivery past its zone's ``max_age`` is not deleted quietly (the original drops such
rows after 30 days without a word): the collector leases it and reports it rejected
on the RESULTS stream, exactly as a sender would, so the result applier removes it
and the sender gets the usual bounce. Normally the retry schedule bounces a delivery
before it gets that old; this catches the rest (a zone without senders, a paused
domain, a schedule changed under queued mail).
"""

from __future__ import annotations

import asyncio
import logging
import time

from zmta_common import service
from zmta_common.bus import Bus
from zmta_common.config import Config
from zmta_common.events import REJECTED, DeliveryReport, reported_subject
from zmta_common.store import Store

log = logging.getLogger(__name__)

OWNER = "queue-gc"
BATCH = 500
LOG_BATCH = 10000  # delivery log entries removed per statement (store.expire_log's limit)


class GarbageCollector:
    def __init__(self, config: Config, store: Store, bus: Bus) -> None:
        self.config = config
        self.store = store
        self.bus = bus

    async def run(self, stop: asyncio.Event) -> None:
        await service.every(self.config.queue.gc_interval, self.collect, stop, "garbage collection")

    async def collect(self) -> None:
        removed = await self.store.remove_orphan_messages(self.config.queue.orphan_age)
        if removed:
            log.warning("messages without deliveries removed", extra={"count": removed})
        for name, zone in self.config.zones.items():
            while await self._expire(name, zone.max_age):
                pass
        retention = self.config.delivery_log.retention_days
        if retention > 0:
            while await self.store.expire_log(retention) == LOG_BATCH:
                pass

    async def _expire(self, zone: str, max_age: float) -> int:
        """Report one batch of the zone's too-old deliveries rejected; return how many."""
        leases = await self.store.lease_expired(zone, max_age, BATCH, OWNER)
        limit = f"{max_age / 3600:g} hours" if max_age >= 3600 else f"{max_age:g} seconds"
        for lease in leases:
            report = DeliveryReport(
                id=lease.id,
                seq=lease.seq,
                zone=zone,
                lease_token=lease.lease_token,
                status=REJECTED,
                response=f"451 4.4.7 Message expired: not delivered within {limit}",
                category="expired",
                time=time.time(),
            )
            await self.bus.js.publish(
                reported_subject(zone), report.encode(), headers={"Nats-Msg-Id": f"gc:{lease.id}:{lease.seq}"}
            )
        if leases:
            log.warning("expired deliveries bounced", extra={"zone": zone, "count": len(leases)})
        return len(leases)
