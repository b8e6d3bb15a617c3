"""The NATS connection every service uses, and the JetStream streams they share.

Streams are declared in :mod:`zmta_common.events`; :func:`connect` makes sure they
exist (idempotently) so that no service depends on another having started first.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

import nats
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, RetentionPolicy, StorageType, StreamConfig
from nats.js.errors import BadRequestError

from .events import STREAM_NOTIFY, STREAMS, MessageQueued, queued_subject

BatchHandler = Callable[[list[Msg]], Awaitable[None]]

log = logging.getLogger(__name__)


class Bus:
    """A connected NATS client with its JetStream context."""

    def __init__(self, nc: NATS) -> None:
        self.nc = nc
        self.js: JetStreamContext = nc.jetstream()

    async def close(self) -> None:
        """Let pending publishes and callbacks finish (a few seconds at most), then disconnect."""
        if self.nc.is_closed:
            return
        try:
            await asyncio.wait_for(self.nc.drain(), 5)
        except (TimeoutError, nats.errors.Error):
            await self.nc.close()


async def connect(url: str, name: str) -> Bus:
    """Connect (retrying for ever in the background once connected) and declare the streams."""

    async def on_error(exc: Exception) -> None:
        log.warning("nats error", extra={"error": str(exc)})

    nc = await nats.connect(
        url,
        name=name,
        max_reconnect_attempts=-1,
        reconnect_time_wait=0.5,
        error_cb=on_error,
    )
    bus = Bus(nc)
    await ensure_streams(bus.js)
    return bus


# A bounce event is retried for BOUNCE_RETRY_SPAN at most, and each try may publish its
# notifications again: their stream must recognise them as duplicates for all that time.
BOUNCE_RETRY_SPAN = 6 * 3600.0
DUPLICATE_WINDOWS = {STREAM_NOTIFY: BOUNCE_RETRY_SPAN + 3600.0}


async def ensure_streams(js: JetStreamContext) -> None:
    for name, subjects in STREAMS.items():
        config = StreamConfig(
            name=name,
            subjects=subjects,
            retention=RetentionPolicy.WORK_QUEUE,
            storage=StorageType.FILE,
            # Publishers set Nats-Msg-Id, so a re-sent event within this window is stored once.
            duplicate_window=DUPLICATE_WINDOWS.get(name, 120.0),
        )
        try:
            await js.add_stream(config)
        except BadRequestError:
            # Exists with another config (e.g. an older release): bring it in line.
            await js.update_stream(config)


# How long one pull waits for messages when none are pending. It bounds how long a
# stopping service waits for its consumers; an idle consumer costs a pull per period.
FETCH_WAIT = 0.25


async def consume(
    js: JetStreamContext,
    stream: str,
    durable: str,
    handle: BatchHandler,
    stop: asyncio.Event,
    batch: int = 100,
    ack_wait: float = 60,
    max_deliver: int = -1,
) -> None:
    """Feed batches of a stream's messages to ``handle`` until ``stop`` is set.

    A durable pull consumer with explicit acks: ``handle`` acks (or naks) each
    message once its effect is safe, so a message survives a crash of this process.
    Replicas using the same ``durable`` share the stream's messages. ``max_deliver``
    bounds the deliveries of one message (-1: no bound).
    """
    # Created or updated here (the server takes a create request for an existing consumer
    # as an update), so a release that adds a subject to a stream reaches old consumers.
    await js.add_consumer(
        stream,
        ConsumerConfig(
            name=durable,
            durable_name=durable,
            ack_policy=AckPolicy.EXPLICIT,
            ack_wait=ack_wait,
            max_ack_pending=10000,
            max_deliver=max_deliver,
            filter_subjects=STREAMS[stream],
        ),
    )
    sub = await js.pull_subscribe_bind(durable=durable, stream=stream)
    try:
        while not stop.is_set():
            try:
                msgs = await sub.fetch(batch, timeout=FETCH_WAIT)
            except TimeoutError:  # nothing pending (nats-py raises its own or asyncio's)
                continue
            except Exception as exc:  # NATS reconnecting: try again shortly
                log.warning("fetch failed", extra={"stream": stream, "error": repr(exc)})
                await asyncio.sleep(1)
                continue
            await handle(msgs)
    finally:
        await sub.unsubscribe()


async def announce_queued(bus: Bus, message_id: str, zones: dict[str, int]) -> None:
    """Wake the senders of each zone a new message was queued for. Best effort: they poll too."""
    for zone, count in zones.items():
        try:
            await bus.nc.publish(
                queued_subject(zone), MessageQueued(id=message_id, zone=zone, deliveries=count).encode()
            )
        except Exception as exc:  # NATS down: the message is stored, the senders will find it
            log.warning("announce failed", extra={"id": message_id, "zone": zone, "error": repr(exc)})
