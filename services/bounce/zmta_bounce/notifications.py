"""HTTP bounce notifications: each bounce POSTed to every configured URL until it says 2xx.

The bounce consumer puts one :class:`Notification` per URL on the durable NOTIFY
stream; this consumer POSTs them. A refusal (a status other than 2xx, or no answer)
is negatively acknowledged with the next delay of ``bounce.notify_backoff``, so
JetStream hands the notification back later, across restarts of this service. One
that is still refused ``notify_max_age`` after its bounce is given up and logged.

The body is form-encoded with the field names of the original's http-bounce plugin
(id, sessionId, to, seq, returnPath, category, time in ms, response, fbl), so
receivers written for it keep working.
"""

from __future__ import annotations

import asyncio
import logging
import time

import httpx
from nats.aio.msg import Msg

from zmta_common.bus import Bus, consume
from zmta_common.config import Config
from zmta_common.events import STREAM_NOTIFY, BounceEvent, Notification, SchemaError
from zmta_common.headers import HeaderBlock

log = logging.getLogger(__name__)

CONSUMER = "zmta-bounce-notify"


def fields(event: BounceEvent, headers: HeaderBlock) -> dict[str, str]:
    """The original's notification fields for one bounce."""
    return {
        "id": event.id,
        "sessionId": "",
        "to": event.recipient,
        "seq": event.seq,
        "returnPath": event.mail_from,
        "category": event.category,
        "time": str(int(event.time * 1000)),
        "response": event.response,
        "fbl": (headers.get("x-fbl") or "").strip(),
    }


class NotificationSender:
    def __init__(self, config: Config, bus: Bus) -> None:
        self.config = config
        self.bus = bus
        self.sent = 0

    async def run(self, stop: asyncio.Event) -> None:
        timeout = self.config.bounce.notify_timeout
        async with httpx.AsyncClient(timeout=timeout, follow_redirects=False) as self.http:
            # A POST may take notify_timeout; the ack deadline leaves room for a batch of them.
            await consume(self.bus.js, STREAM_NOTIFY, CONSUMER, self.handle, stop, batch=20, ack_wait=timeout * 3)

    async def handle(self, msgs: list[Msg]) -> None:
        await asyncio.gather(*(self._one(msg) for msg in msgs))

    async def _one(self, msg: Msg) -> None:
        try:
            note = Notification.decode(msg.data)
        except SchemaError as exc:
            log.error("unreadable notification dropped", extra={"error": str(exc)})
            await msg.term()
            return
        error = await self._post(note)
        if error is None:
            self.sent += 1
            await msg.ack()
            return
        tries = msg.metadata.num_delivered
        extra = {"id": note.fields.get("id"), "seq": note.fields.get("seq"), "url": note.url, "tries": tries}
        if time.time() - note.created > self.config.bounce.notify_max_age:
            log.error("bounce notification given up", extra={**extra, "error": error})
            await msg.term()
            return
        backoff = self.config.bounce.notify_backoff
        delay = backoff[min(tries, len(backoff)) - 1]
        log.warning("bounce notification refused, will retry", extra={**extra, "error": error, "retry_in": delay})
        await msg.nak(delay=delay)

    async def _post(self, note: Notification) -> str | None:
        """None when the receiver took it, else why not."""
        try:
            response = await self.http.post(note.url, data=note.fields)
        except httpx.HTTPError as exc:
            return repr(exc)
        if 200 <= response.status_code < 300:
            return None
        return f"HTTP {response.status_code}"
