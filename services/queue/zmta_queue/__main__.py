"""``python -m zmta_queue``: work leasing, result applying, housekeeping and garbage collection."""

from __future__ import annotations

import asyncio
import logging

from redis.asyncio import Redis

from zmta_common import bus as zbus
from zmta_common import hooks, metrics, service
from zmta_common.config import Config
from zmta_common.limits import Blacklist, ZoneLimits
from zmta_common.mx import MxLookup
from zmta_common.store import Store

from .collector import GarbageCollector
from .housekeeping import Housekeeping
from .leasing import WorkDesk
from .results import ResultApplier

log = logging.getLogger("zmta_queue")


async def main(config: Config, stop: asyncio.Event) -> None:
    store = await Store.connect(config.dbs.postgres, config.dbs.postgres_pool_size)
    bus = await zbus.connect(config.dbs.nats, "queue")
    redis = Redis.from_url(config.dbs.redis)
    lookup = MxLookup(config.dns, redis)
    limits = {name: ZoneLimits(redis, name, zone, lookup) for name, zone in config.zones.items()}
    await WorkDesk(config, store, redis, limits).start(bus.nc)
    tasks = [
        asyncio.create_task(
            ResultApplier(config, store, bus, limits, hooks.load(config, "queue")).run(stop), name="results"
        ),
        asyncio.create_task(Housekeeping(config, store, Blacklist(redis)).run(stop), name="housekeeping"),
        asyncio.create_task(GarbageCollector(config, store, bus).run(stop), name="gc"),
    ]

    async def health() -> dict[str, object]:
        await store.pool.fetchval("SELECT 1")
        await redis.ping()
        return {"nats": bus.nc.is_connected}

    metrics_task = await metrics.serve(config.metrics.host, config.metrics.queue_port, health)
    log.info("running")
    await stop.wait()
    await asyncio.gather(*tasks, return_exceptions=True)
    metrics_task.cancel()
    await bus.close()
    await redis.aclose()
    await store.close()


cli = service.command("queue", main, "Run the queue service.")

if __name__ == "__main__":
    cli()
