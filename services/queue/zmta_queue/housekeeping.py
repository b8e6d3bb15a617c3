"""Periodic chores: expired leases back to the queue, ended traffic shaping overrides
removed (and logged), queue-size, blacklist and shaping gauges."""

from __future__ import annotations

import asyncio
import logging

from zmta_common import metrics, service
from zmta_common.config import Config
from zmta_common.limits import Blacklist
from zmta_common.shaping import Overrides, log_ended
from zmta_common.store import Store

log = logging.getLogger(__name__)


class Housekeeping:
    def __init__(self, config: Config, store: Store, blacklist: Blacklist, overrides: Overrides) -> None:
        self.config = config
        self.store = store
        self.blacklist = blacklist
        self.overrides = overrides

    async def run(self, stop: asyncio.Event) -> None:
        await service.every(self.config.queue.housekeeping_interval, self.tick, stop, "housekeeping")

    async def tick(self) -> None:
        released = await self.store.release_expired_leases()
        if released:
            log.warning("expired leases released", extra={"count": released})
        counts = await self.store.queue_counts()
        for zone in self.config.zones:
            c = counts.get(zone)
            metrics.queue_size.labels(type="queued", zone=zone).set(c.queued if c else 0)
            metrics.queue_size.labels(type="deferred", zone=zone).set(c.deferred if c else 0)
        metrics.blacklisted.set(await self.blacklist.count())
        await self.shaping()

    async def shaping(self) -> None:
        for zone in self.config.zones:
            for ended in await self.overrides.sweep(zone):
                log_ended(ended)
            active = await self.overrides.active(zone)
            for scope in ("site", "site_address", "zone"):
                for action in ("suspend", "throttle"):
                    count = sum(1 for o in active if o.scope == scope and o.action == action)
                    metrics.shaping_active.labels(zone=zone, scope=scope, action=action).set(count)
