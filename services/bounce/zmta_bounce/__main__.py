"""``python -m zmta_bounce``: the classifier responder, the bounce event consumer and the
HTTP notification sender."""

from __future__ import annotations

import asyncio
import logging

from zmta_common import bus as zbus
from zmta_common import hooks, metrics, service
from zmta_common.config import Config
from zmta_common.store import Store

from .classifier import Classifier, RulesError, load_all
from .consumer import BounceConsumer
from .notifications import NotificationSender
from .responder import ClassifyResponder

log = logging.getLogger("zmta_bounce")


async def main(config: Config, stop: asyncio.Event) -> None:
    try:
        classifier = Classifier(load_all(config.bounce.rules_files))
    except RulesError as exc:
        log.error("bad bounce rules", extra={"error": str(exc)})
        raise SystemExit(2) from None
    store = await Store.connect(config.dbs.postgres, config.dbs.postgres_pool_size)
    bus = await zbus.connect(config.dbs.nats, "bounce")
    await ClassifyResponder(classifier).start(bus.nc)
    consumer = BounceConsumer(config, store, bus, hooks.load(config, "bounce"))
    notification_sender = NotificationSender(config, bus)
    tasks = [
        asyncio.create_task(consumer.run(stop), name="bounces"),
        asyncio.create_task(notification_sender.run(stop), name="notifications"),
    ]

    async def health() -> dict[str, object]:
        return {
            "rules": len(classifier.rules),
            "nats": bus.nc.is_connected,
            "bounces": consumer.handled,
            "notifications": notification_sender.sent,
        }

    metrics_task = await metrics.serve(config.metrics.host, config.metrics.bounce_port, health)
    log.info("running", extra={"rules": len(classifier.rules)})
    await stop.wait()
    await asyncio.gather(*tasks, return_exceptions=True)
    metrics_task.cancel()
    await bus.close()
    await store.close()


cli = service.command("bounce", main, "Run the bounce service.")

if __name__ == "__main__":
    cli()
