"""The delivery log as a stream: its entries published on NATS (``zmta.log.<action>``)
and POSTed to ``delivery_log.webhook_url``, for the operator's own analytics.

The log table is the one record of what happened, so the stream reads it rather than
every writer publishing as well (intake, the queue and the api would each pay for it per
message, and a publish could say what a rolled-back transaction never did). One bounce
replica streams at a time (a lease in Redis), from the position kept beside the log in
PostgreSQL, so a replica that takes over goes on where the last one stopped: at least once,
in order, ``delivery_log.stream_lag`` seconds behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket

import httpx
from redis.asyncio import Redis

from zmta_common import redis_keys
from zmta_common.bus import Bus
from zmta_common.config import Config
from zmta_common.events import LogEvent, log_subject
from zmta_common.store import LogEntry, Store

log = logging.getLogger(__name__)

INTERVAL = 1.0  # seconds between reads of the log
BATCH = 500  # entries read, published and POSTed at once
LEADER_TTL = 10  # seconds the streaming replica's lease lasts without renewal


class LogStream:
    def __init__(self, config: Config, store: Store, bus: Bus, redis: Redis) -> None:
        self.config = config
        self.store = store
        self.bus = bus
        self.redis = redis
        self.name = f"{socket.gethostname()}:{os.getpid()}"
        self.http = httpx.AsyncClient(timeout=10)
        self.streamed = 0

    async def run(self, stop: asyncio.Event) -> None:
        try:
            while not stop.is_set():
                try:
                    if await self._lead():
                        while await self.step() == BATCH:
                            pass
                except Exception as exc:  # the store, Redis, NATS or the webhook: try again
                    log.warning("log stream paused", extra={"error": repr(exc)})
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), INTERVAL)
        finally:
            await self.http.aclose()

    async def _lead(self) -> bool:
        """Take or keep the lease of the streaming replica."""
        taken = await self.redis.set(redis_keys.LOG_STREAM_LEADER, self.name, nx=True, ex=LEADER_TTL)
        if taken:
            return True
        holder = await self.redis.get(redis_keys.LOG_STREAM_LEADER)
        if holder is not None and (holder.decode() if isinstance(holder, bytes) else holder) == self.name:
            await self.redis.expire(redis_keys.LOG_STREAM_LEADER, LEADER_TTL)
            return True
        return False

    async def step(self) -> int:
        """Stream the next batch; how many entries it held."""
        position = await self.store.stream_position()
        batch = await self.store.log_after(position, self.config.delivery_log.stream_lag, BATCH)
        if not batch:
            return 0
        entries = [entry for _, entry in batch]
        if self.config.delivery_log.webhook_url is not None:
            response = await self.http.post(str(self.config.delivery_log.webhook_url), json=[e.view() for e in entries])
            response.raise_for_status()
        for entry in entries:
            await self.bus.nc.publish(log_subject(entry.action), _event(entry).encode())
        await self.store.set_stream_position(batch[-1][0])
        self.streamed += len(batch)
        return len(batch)


def _event(entry: LogEntry) -> LogEvent:
    return LogEvent(
        time=entry.time.timestamp(),
        action=entry.action,
        id=entry.id,
        seq=entry.seq or "",
        zone=entry.zone or "",
        mail_from=entry.mail_from or "",
        recipient=entry.recipient or "",
        domain=entry.domain or "",
        details=entry.details,
    )
