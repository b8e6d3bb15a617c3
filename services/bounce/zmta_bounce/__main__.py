"""``python -m zmta_bounce``: the classifier responder and the bounce event consumer."""

from __future__ import annotations

import asyncio
import logging

from zmta_common import bus as zbus
from zmta_common import metrics, service
from zmta_common.config import Config
from zmta_common.store import Store

from .classifier import Classifier, load_rules
from .notifications import BounceConsumer
from .responder import ClassifyResponder

log = logging.getLogger("zmta_bounce")


async def main(config: Config, stop: asyncio.Event) -> None:
    classifier = Classifier(load_rules())
    store = await Store.connect(config.dbs.postgres, config.dbs.postgres_pool_size)
    bus = await zbus.connect(config.dbs.nats, "bounce")
    await ClassifyResponder(classifier).start(bus.nc)
    consumer = BounceConsumer(config, store, bus)
    task = asyncio.create_task(consumer.run(stop), name="bounces")

    async def health() -> dict[str, object]:
        return {"rules": len(classifier.rules), "nats": bus.nc.is_connected, "bounces": consumer.handled}

    metrics_task = await metrics.serve(config.metrics.host, config.metrics.bounce_port, health)
    log.info("running", extra={"rules": len(classifier.rules)})
    await stop.wait()
    await asyncio.gather(task, return_exceptions=True)
    metrics_task.cancel()
    await bus.close()
    await store.close()


cli = service.command("bounce", main, "Run the bounce service.")

if __name__ == "__main__":
    cli()
