"""What every part of the store shares: the connection type and the pools it works through."""

from __future__ import annotations

from datetime import UTC, datetime

import asyncpg
from asyncpg.pool import PoolConnectionProxy

Connection = asyncpg.Connection | PoolConnectionProxy


class StoreBase:
    """The pools of a :class:`~zmta_common.store.Store`, which each of its parts works through."""

    pool: asyncpg.Pool  # the queue's work
    chunk_pool: asyncpg.Pool  # the leading chunks of big messages (see IntakeTransaction)


def utcnow() -> datetime:
    return datetime.now(UTC)
