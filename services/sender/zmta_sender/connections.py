"""Idle SMTP connections kept for the next delivery to the same server.

As the original's connection cache: after a successful transaction the connection
is parked for a few seconds (``idle_ttl``) unless it has carried ``max_uses``
messages; the next delivery from the same local address to the same server takes
it instead of connecting, greeting and negotiating TLS again. A failed transaction
closes its connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import defaultdict
from dataclasses import dataclass, field

import aiosmtplib

PoolKey = tuple[str | None, str, str, int]  # local address, EHLO name, server IP, port


@dataclass(slots=True)
class Connection:
    smtp: aiosmtplib.SMTP
    uses: int = 0
    idle_since: float = field(default_factory=time.monotonic)


class ConnectionPool:
    def __init__(self, idle_ttl: float = 5.0, max_uses: int = 100) -> None:
        self.idle_ttl = idle_ttl
        self.max_uses = max_uses
        self._idle: dict[PoolKey, list[Connection]] = defaultdict(list)
        self.reuses = 0

    def take(self, key: PoolKey) -> Connection | None:
        """A parked connection to the same server that is still open, if there is one."""
        parked = self._idle.get(key)
        while parked:
            conn = parked.pop()
            if conn.smtp.is_connected and time.monotonic() - conn.idle_since < self.idle_ttl:
                self.reuses += 1
                return conn
            conn.smtp.close()
        return None

    async def give(self, key: PoolKey, conn: Connection) -> None:
        """Park a connection after a successful transaction (or QUIT it when it is used up)."""
        conn.uses += 1
        if conn.uses >= self.max_uses or not conn.smtp.is_connected:
            await close(conn.smtp)
            return
        conn.idle_since = time.monotonic()
        self._idle[key].append(conn)

    @property
    def idle(self) -> int:
        return sum(len(v) for v in self._idle.values())

    async def reap(self) -> None:
        """QUIT connections idle for longer than ``idle_ttl``."""
        now = time.monotonic()
        for key in list(self._idle):
            keep: list[Connection] = []
            old: list[Connection] = []
            for conn in self._idle[key]:
                (keep if now - conn.idle_since < self.idle_ttl else old).append(conn)
            self._idle[key] = keep
            if not keep:
                del self._idle[key]
            await asyncio.gather(*(close(c.smtp) for c in old))

    async def run_reaper(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 1.0)
            await self.reap()

    async def close_all(self) -> None:
        idle, self._idle = self._idle, defaultdict(list)
        await asyncio.gather(*(close(c.smtp) for conns in idle.values() for c in conns))


async def close(smtp: aiosmtplib.SMTP) -> None:
    """QUIT politely; just drop the socket when the server is gone or slow."""
    try:
        if smtp.is_connected:
            await smtp.quit(timeout=5)
    except (aiosmtplib.SMTPException, OSError):
        smtp.close()
