"""Open SMTP connections: their zone-wide slots, their reuse, their pace.

As the original's connection cache, a connection that carried a message is parked
for a few seconds (``idle_ttl``) unless it has carried ``max_uses`` messages; the
next delivery from the same local address to the same recipient domain on the same
server takes it instead of connecting, greeting and negotiating TLS again. A failed
transaction closes its connection, and a parked one is not taken again once the server
said anything unasked on it (a 421 before hanging up).

Every open connection, busy or parked, holds a slot of its recipient domain (and its
site) in Redis (:class:`~zmta_common.limits.ZoneLimits`), so a domain's
connection limit holds for the whole zone. The slots are renewed while the
connection lives and freed when it closes; parked connections are closed early when
another sender waits for a slot of theirs. ``throttling`` spaces the messages sent
over one connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections import defaultdict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from zmta_common.limits import ZoneLimits

from .errors import DeliveryError
from .smtp_session import SmtpSession

log = logging.getLogger(__name__)

PoolKey = tuple[str | None, str, str, int, str]  # local address, EHLO name, server IP, port, recipient domain


@dataclass(slots=True)
class Connection:
    session: SmtpSession
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    slot_keys: list[str] = field(default_factory=list)
    uses: int = 0
    idle_since: float = field(default_factory=time.monotonic)
    last_sent: float = 0.0


class ConnectionPool:
    def __init__(
        self,
        limits: ZoneLimits | None = None,
        interval: float = 0.0,
        idle_ttl: float = 5.0,
        max_uses: int = 100,
        slot_wait: float = 60.0,
        slot_ttl: float = 15.0,
    ) -> None:
        self.limits = limits
        self.interval = interval  # seconds between messages on one connection (throttling)
        self.idle_ttl = idle_ttl
        self.max_uses = max_uses
        self.slot_wait = slot_wait
        self.slot_ttl = slot_ttl  # seconds a slot lives without renewal (a crashed sender's slots free themselves)
        self._idle: dict[PoolKey, list[Connection]] = defaultdict(list)
        self._open: dict[str, Connection] = {}
        self.reuses = 0

    @property
    def idle(self) -> int:
        return sum(len(v) for v in self._idle.values())

    async def take(self, key: PoolKey) -> Connection | None:
        """A parked connection for the same server and domain that is still open, if there is one.
        A stale one found on the way is dropped (no QUIT on this delivery's time), and its slot
        freed at once: it would otherwise hold the domain's limit until the slot expires."""
        # Chosen before the first await: the upkeep task swaps the parked lists out while
        # it runs, and a list held across an await could hand out a connection it also has.
        parked = self._idle.get(key)
        found, stale = None, []
        while parked:
            conn = parked.pop()
            if conn.session.usable and time.monotonic() - conn.idle_since < self.idle_ttl:
                found = conn
                break
            stale.append(conn)
        for conn in stale:
            self._forget(conn)
            conn.session.close()
            await self._free_slot(conn)
        if found is not None:
            self.reuses += 1
        return found

    async def open(self, domain: str, site: str | None, connect: Callable[[], Awaitable[SmtpSession]]) -> Connection:
        """A new connection, once a slot for ``domain`` (and ``site``) is free."""
        conn_id = uuid.uuid4().hex
        keys: list[str] = []
        if self.limits is not None:
            keys = self.limits.connection_keys(domain, site)[0]
            deadline = time.monotonic() + self.slot_wait
            while not await self.limits.acquire_connection(conn_id, domain, site, self.slot_ttl):
                if time.monotonic() > deadline:
                    raise DeliveryError(f"no free connection slot for {domain} in {self.slot_wait:.0f}s", "rate")
                if not await self._close_parked(keys):
                    await asyncio.sleep(0.1)
        try:
            session = await connect()
        except BaseException:
            if self.limits is not None:
                await self.limits.release_connection(conn_id, keys)
            raise
        conn = Connection(session, id=conn_id, slot_keys=keys)
        self._open[conn_id] = conn
        return conn

    async def _close_parked(self, keys: list[str]) -> bool:
        """Close the longest-parked connection of ours that holds a slot under one of ``keys``
        (the same domain, or another domain of the same site): a new connection needs its
        place now, not at the next upkeep. False when there is none."""
        parked = [(conn.idle_since, key, conn) for key, conns in self._idle.items() for conn in conns]
        for _, key, conn in sorted(parked, key=lambda p: p[0]):
            if set(conn.slot_keys) & set(keys):
                self._idle[key].remove(conn)
                await self.discard(conn)
                return True
        return False

    async def pace(self, conn: Connection) -> None:
        """Wait until the connection may carry its next message (``throttling``)."""
        if self.interval and conn.last_sent:
            delay = conn.last_sent + self.interval - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)

    async def give(self, key: PoolKey, conn: Connection) -> None:
        """Park a connection after a successful transaction (or QUIT it when it is used up)."""
        conn.uses += 1
        conn.last_sent = time.monotonic()
        if conn.uses >= self.max_uses or not conn.session.usable:
            await self.discard(conn)
            return
        conn.idle_since = time.monotonic()
        self._idle[key].append(conn)

    async def discard(self, conn: Connection) -> None:
        """QUIT (or drop) a connection and free its slot. It counts as open until then, so
        that a sender stopping meanwhile (close_all) still drops it and frees its slot."""
        try:
            await conn.session.quit(timeout=5)  # QUIT politely; just dropped when the server is gone or slow
        finally:
            self._forget(conn)
            await self._free_slot(conn)

    async def _free_slot(self, conn: Connection) -> None:
        if self.limits is not None and conn.slot_keys:
            with contextlib.suppress(Exception):  # Redis down: the slot expires by itself
                await self.limits.release_connection(conn.id, conn.slot_keys)

    def _forget(self, conn: Connection) -> None:
        self._open.pop(conn.id, None)

    async def maintain(self) -> None:
        """Renew the slots of open connections; close parked ones that are old or wanted elsewhere."""
        now = time.monotonic()
        # Take the parked connections out while deciding: a delivery must not take one
        # that is about to be closed, nor may one in use be parked again.
        parked, self._idle = self._idle, defaultdict(list)
        for key, conns in parked.items():
            for conn in conns:
                expired = now - conn.idle_since >= self.idle_ttl or not conn.session.usable
                if expired or await self._wanted(conn):
                    await self.discard(conn)
                else:
                    self._idle[key].append(conn)
        if self.limits is not None:
            await self.limits.renew_connections({c.id: c.slot_keys for c in self._open.values()}, self.slot_ttl)

    async def _wanted(self, conn: Connection) -> bool:
        if self.limits is None:
            return False
        try:
            return await self.limits.wanted(conn.slot_keys)
        except Exception:  # Redis down: keep the connection; its idle time still runs out
            return False

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.5)
            try:
                await self.maintain()
            except Exception as exc:  # Redis down: slots expire, connections time out
                log.warning("connection upkeep failed", extra={"error": repr(exc)})

    async def close_all(self) -> None:
        """QUIT the parked connections; drop the ones still in use (a stopping sender has
        cancelled their deliveries) without waiting for a QUIT. Every slot is freed now:
        left to expire, it would hold the domain's connection limit for its slot_ttl after
        this sender is gone."""
        for conns in list(self._idle.values()):
            for conn in conns:
                await self.discard(conn)
        self._idle.clear()
        for conn in list(self._open.values()):
            self._forget(conn)
            conn.session.close()
            await self._free_slot(conn)
