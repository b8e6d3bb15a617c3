"""Consumes bounce events from the durable BOUNCES stream.

For now every bounce is logged and counted; DSN mails, HTTP notifications and
suppression are built on this consumer.
"""

from __future__ import annotations

import asyncio
import logging

from nats.aio.msg import Msg
from nats.js import JetStreamContext

from zmta_common.bus import consume
from zmta_common.events import STREAM_BOUNCES, BounceEvent, SchemaError

log = logging.getLogger(__name__)

CONSUMER = "zmta-bounce"


class BounceConsumer:
    def __init__(self, js: JetStreamContext) -> None:
        self.js = js
        self.handled = 0

    async def run(self, stop: asyncio.Event) -> None:
        await consume(self.js, STREAM_BOUNCES, CONSUMER, self.handle, stop, batch=50)

    async def handle(self, msgs: list[Msg]) -> None:
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
