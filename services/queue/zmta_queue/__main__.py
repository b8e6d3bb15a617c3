"""``python -m zmta_queue``: work leasing, result applying, housekeeping and garbage collection."""

from __future__ import annotations

import asyncio
import logging

from zmta_common import hooks, service
from zmta_common.config import Config
from zmta_common.limits import Blacklist, ZoneLimits
from zmta_common.mx import MxLookup
from zmta_common.shaping import Overrides

from .collector import GarbageCollector
from .housekeeping import Housekeeping
from .leasing import WorkDesk
from .results import ResultApplier

log = logging.getLogger("zmta_queue")


async def main(config: Config, stop: asyncio.Event) -> None:
    async with service.connections(config, "queue") as conn:
        store, bus, redis = conn.store, conn.bus, conn.redis
        lookup = MxLookup(config.dns, redis)
        limits = {name: ZoneLimits(redis, name, zone, lookup) for name, zone in config.zones.items()}
        await WorkDesk(config, store, redis, limits).start(bus.nc)
        results = ResultApplier(config, store, bus, limits, hooks.load(config, "queue"))

        async def health() -> dict[str, object]:
            await store.pool.fetchval("SELECT 1")
            await redis.ping()
            return {"nats": bus.nc.is_connected}

        async with service.health_endpoint(config, config.metrics.queue_port, health):
            log.info("running")
            await asyncio.gather(
                results.run(stop),
                Housekeeping(config, store, Blacklist(redis), Overrides(redis)).run(stop),
                GarbageCollector(config, store, bus).run(stop),
                return_exceptions=True,
            )


cli = service.command("queue", main, "Run the queue service.")

if __name__ == "__main__":
    cli()
