"""``python -m zmta_bounce``: the classifier responder, the bounce event consumer, the
HTTP notification sender and the delivery log stream."""

from __future__ import annotations

import asyncio
import logging

from zmta_common import hooks, service
from zmta_common.config import Config

from .classifier import Classifier, RulesError, load_all
from .consumer import BounceConsumer
from .log_stream import LogStream
from .notifications import NotificationSender
from .responder import ClassifyResponder

log = logging.getLogger("zmta_bounce")


async def main(config: Config, stop: asyncio.Event) -> None:
    try:
        classifier = Classifier(load_all(config.bounce.rules_files))
    except RulesError as exc:
        log.error("bad bounce rules", extra={"error": str(exc)})
        raise SystemExit(2) from None
    async with service.connections(config, "bounce") as conn:
        await ClassifyResponder(classifier).start(conn.bus.nc)
        consumer = BounceConsumer(config, conn.store, conn.bus, hooks.load(config, "bounce"))
        notification_sender = NotificationSender(config, conn.bus)

        async def health() -> dict[str, object]:
            return {
                "rules": len(classifier.rules),
                "nats": conn.bus.nc.is_connected,
                "bounces": consumer.handled,
                "notifications": notification_sender.sent,
            }

        async with service.health_endpoint(config, config.metrics.bounce_port, health):
            log.info("running", extra={"rules": len(classifier.rules)})
            tasks = [consumer.run(stop), notification_sender.run(stop)]
            if config.delivery_log.stream or config.delivery_log.webhook_url is not None:
                tasks.append(LogStream(config, conn.store, conn.bus, conn.redis).run(stop))
            await asyncio.gather(*tasks, return_exceptions=True)


cli = service.command("bounce", main, "Run the bounce service.")

if __name__ == "__main__":
    cli()
