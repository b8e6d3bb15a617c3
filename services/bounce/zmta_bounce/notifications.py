"""Consumes bounce events from the durable BOUNCES stream.

For now every bounce is logged and counted; DSN mails, HTTP notifications and
suppression are built on this consumer.
"""

from __future__ import annotations

import asyncio
import logging

from nats.errors import TimeoutError as NatsTimeout
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig

from zmta_common.events import STREAM_BOUNCES, BounceEvent, SchemaError

log = logging.getLogger(__name__)

CONSUMER = "zmta-bounce"


class BounceConsumer:
    def __init__(self, js: JetStreamContext) -> None:
        self.js = js
        self.handled = 0

    async def run(self, stop: asyncio.Event) -> None:
        sub = await self.js.pull_subscribe(
            "zmta.delivery.bounced.>",
            durable=CONSUMER,
            stream=STREAM_BOUNCES,
            config=ConsumerConfig(ack_policy=AckPolicy.EXPLICIT, ack_wait=60),
        )
        try:
            await self._consume(sub, stop)
        finally:
            await sub.unsubscribe()

    async def _consume(self, sub: JetStreamContext.PullSubscription, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                msgs = await sub.fetch(50, timeout=1)
            except NatsTimeout:
                continue
            except Exception as exc:
                log.warning("fetch failed", extra={"error": repr(exc)})
                await asyncio.sleep(1)
                continue
            for msg in msgs:
                try:
                    event = BounceEvent.decode(msg.data)
                except SchemaError as exc:
                    log.error("unreadable bounce event dropped", extra={"error": str(exc)})
                    await msg.term()
                    continue
                log.info(
                    "bounce",
                    extra={
                        "id": event.id,
                        "seq": event.seq,
                        "zone": event.zone,
                        "to": event.recipient,
                        "returnPath": event.mail_from,
                        "category": event.category,
                        "response": event.response,
                    },
                )
                self.handled += 1
                await msg.ack()
