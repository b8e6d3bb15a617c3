"""Consumes bounce and delay events from the durable BOUNCES stream.

For a failed delivery: the HTTP notifications are put on their own durable stream
(one per configured URL, see :mod:`.notifications`), the recipient may be suppressed, and
the DSN is queued; for a delayed one only the "delayed" DSN. Each event is
acknowledged only after all of that is committed, so a crash or a store failure
leaves it on the stream to be handled again: a DSN may go out twice, never not at all.

An event that cannot be handled is retried with a growing delay (5 s doubling up to 10
minutes) for about six hours (:data:`MAX_TRIES`), then given up with an error in the log;
one whose DSN is refused for good (a plugin's 5xx in ``message:headers``,
``message:store`` or ``queue:route``, which run for DSNs as for any message, or a
``bounce.zone`` that no longer exists) is given up at once. Its notifications, published
again by each try, are recognised as duplicates by their stream for longer than that.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime

from nats.aio.msg import Msg

from zmta_common import queueing
from zmta_common.bus import Bus, consume
from zmta_common.config import Config
from zmta_common.domains import domain_of
from zmta_common.events import DELAYED, FAILED, NOTIFY_SUBJECT, STREAM_BOUNCES, BounceEvent, Notification, SchemaError
from zmta_common.headers import HeaderBlock
from zmta_common.hooks import Hooks, Reject
from zmta_common.intake import Envelope, IntakeError, MessageIntake
from zmta_common.store import LogEntry, Store

from . import dsn, notifications

log = logging.getLogger(__name__)

CONSUMER = "zmta-bounce"
FIRST_RETRY = 5.0  # seconds before an event that could not be handled is tried again
LONGEST_RETRY = 600.0
MAX_TRIES = 45  # 5 s doubling to 10 minutes: about six hours (bus.BOUNCE_RETRY_SPAN)


class BounceConsumer:
    def __init__(self, config: Config, store: Store, bus: Bus, hooks: Hooks | None = None) -> None:
        self.config = config
        self.store = store
        self.bus = bus
        self.hooks = hooks or Hooks()
        self.handled = 0

    async def run(self, stop: asyncio.Event) -> None:
        await consume(self.bus.js, STREAM_BOUNCES, CONSUMER, self.handle, stop, batch=50, max_deliver=MAX_TRIES)

    async def handle(self, msgs: list[Msg]) -> None:
        for msg in msgs:
            try:
                event = BounceEvent.decode(msg.data)
            except SchemaError as exc:
                log.error("unreadable bounce event dropped", extra={"error": str(exc)})
                await msg.term()
                continue
            try:
                await self.notify(event)
            except IntakeError as exc:
                if not exc.reply.startswith("5"):
                    await self._retry(msg, event, exc)
                    continue
                log.error("dsn refused", extra={"id": event.id, "seq": event.seq, "reply": exc.reply})
                await msg.term()  # for good: trying again would only publish it all again
                continue
            except Exception as exc:  # the store is down: the event stays on the stream
                await self._retry(msg, event, exc)
                continue
            self.handled += 1
            await msg.ack()

    async def _retry(self, msg: Msg, event: BounceEvent, exc: Exception) -> None:
        tries = msg.metadata.num_delivered or 1
        extra = {"id": event.id, "seq": event.seq, "tries": tries, "error": repr(exc)}
        if tries >= MAX_TRIES:
            log.error("bounce given up", extra=extra)
            await msg.term()
            return
        log.warning("bounce not handled yet", extra=extra)
        await msg.nak(delay=min(LONGEST_RETRY, FIRST_RETRY * 2 ** (tries - 1)))

    async def notify(self, event: BounceEvent) -> None:
        log.info(
            "bounce" if event.kind == FAILED else "delay",
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
        headers = HeaderBlock.parse(event.headers)
        if event.kind == FAILED:
            try:
                await self.hooks.run("queue:bounce", event)
            except Reject as exc:
                log.info("bounce stopped by a plugin", extra={"id": event.id, "seq": event.seq, "reply": exc.reply})
                return
            await self._publish_notifications(event, headers)
            await self._suppress(event)
        if not self.config.bounce.dsn:
            return
        reason = dsn.skip_reason(event, headers)
        if reason is not None:
            log.info("no dsn", extra={"id": event.id, "seq": event.seq, "reason": reason})
            return
        await self._queue_dsn(event)

    async def _publish_notifications(self, event: BounceEvent, headers: HeaderBlock) -> None:
        """One durable notification per URL (deduplicated, so a redelivered event adds none)."""
        body = notifications.fields(event, headers)
        for index, url in enumerate(self.config.bounce.notify_urls):
            note = Notification(url=url, fields=body, created=event.time)
            await self.bus.js.publish(
                NOTIFY_SUBJECT, note.encode(), headers={"Nats-Msg-Id": f"notify:{event.id}:{event.seq}:{index}"}
            )

    async def _suppress(self, event: BounceEvent) -> None:
        """Suppress a recipient a server refused for good as unknown, when so configured."""
        permanent = event.response[:1] == "5"
        if self.config.bounce.suppress_unknown_recipients and permanent and event.category == "recipient_unknown":
            entry = await self.store.add_suppression(address=event.recipient)
            log.info("recipient suppressed", extra={"id": event.id, "seq": event.seq, "suppression": entry.id})

    async def _queue_dsn(self, event: BounceEvent) -> None:
        zone = self.config.zones.get(event.zone)
        retry_until = event.arrival + zone.max_age if zone and event.arrival else None
        raw, recipient = dsn.build(event, self.config.hostname, self.config.dsn_zone, retry_until)
        envelope = Envelope(
            mail_from="",
            recipients=[recipient],
            interface="bounce",
            transtype="HTTP",
            allow_routing_headers=True,
        )
        intake = MessageIntake(self.store, self.config, envelope, len(raw) + 1, self.hooks)
        intake.feed(raw)
        queued = await queueing.queue(intake, self.bus)
        log.info("dsn queued", extra={"id": queued.id, "for": f"{event.id}.{event.seq}", "to": recipient})
        kind = "delayed" if event.kind == DELAYED else "failure"
        await self.store.add_log(
            [
                LogEntry(
                    datetime.now(UTC),
                    "QUEUE_BOUNCE",
                    event.id,
                    event.seq,
                    event.zone,
                    event.mail_from.lower() or None,
                    event.recipient.lower(),
                    domain_of(event.recipient),
                    {"bounce_id": queued.id, "reason": kind, "category": event.category},
                )
            ]
        )
