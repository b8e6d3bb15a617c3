"""The queue's system of record in PostgreSQL: messages, body chunks, deliveries, suppressions.

Every query of the project lives in this package, behind :class:`Store`, so the store can
be swapped (MongoDB's place in the original). The rules it keeps:

* Intake: the message row and one delivery row per recipient become visible together
  or not at all, with every chunk of the body already stored (:class:`IntakeTransaction`).
* Leasing takes ready rows with ``FOR UPDATE SKIP LOCKED`` and stamps them with a
  lease token and an expiry; an expired lease makes the row ready again, so a
  crashed sender's work is done again (at-least-once, never lost).
* A delivered or rejected row is deleted; the message and its chunks go with the
  last row of the message (under a lock on the message row, so two last rows
  finishing at once cannot both leave it behind).

Its modules, by role: ``records`` (what goes in and comes out), ``schema`` (migrations),
``intake``, ``leases``, ``outcomes``, ``bodies`` (reading messages), ``collection``
(garbage collection), ``admin`` (what the api reads and steers the queue with) and ``log``
(the delivery log).
"""

from __future__ import annotations

import asyncpg

from . import schema
from .admin import AdminStore
from .base import Connection, StoreBase, utcnow
from .bodies import BodyStore
from .collection import CollectionStore
from .intake import COMMIT_CHECK_TIME, GroupCommit, IntakeLost, IntakeStore, IntakeTransaction
from .leases import Admit, LeaseStore
from .log import DeliveryLogStore
from .outcomes import OutcomeStore
from .records import (
    LOG_ACTIONS,
    AttemptHistory,
    Deferral,
    DeliveryKey,
    DeliveryRow,
    DomainCount,
    DroppedDelivery,
    DropResult,
    HourCount,
    Lease,
    LeaseCandidate,
    LeaseRef,
    LogEntry,
    LogQuery,
    NewDelivery,
    NewMessage,
    OutcomeBatch,
    Pause,
    QueueCounts,
    QueuedRow,
    RetryResult,
    RetryState,
    StoredMessage,
    Suppression,
)
from .schema import MIGRATIONS, Migration
from .schema import _canonical_domains as _canonical_domains  # for the migration tests

__all__ = [
    "COMMIT_CHECK_TIME",
    "LOG_ACTIONS",
    "MIGRATIONS",
    "Admit",
    "AttemptHistory",
    "Connection",
    "Deferral",
    "DeliveryKey",
    "DeliveryRow",
    "DomainCount",
    "DropResult",
    "DroppedDelivery",
    "GroupCommit",
    "HourCount",
    "IntakeLost",
    "IntakeTransaction",
    "Lease",
    "LeaseCandidate",
    "LeaseRef",
    "LogEntry",
    "LogQuery",
    "Migration",
    "NewDelivery",
    "NewMessage",
    "OutcomeBatch",
    "Pause",
    "QueueCounts",
    "QueuedRow",
    "RetryResult",
    "RetryState",
    "Store",
    "StoreBase",
    "StoredMessage",
    "Suppression",
    "utcnow",
]


class Store(IntakeStore, LeaseStore, OutcomeStore, BodyStore, CollectionStore, AdminStore, DeliveryLogStore):
    def __init__(
        self,
        pool: asyncpg.Pool,
        chunk_pool: asyncpg.Pool,
        commit_check_time: float = COMMIT_CHECK_TIME,
        log_enabled: bool = True,
    ) -> None:
        self.pool = pool
        self.chunk_pool = chunk_pool  # the leading chunks of big messages (see IntakeTransaction)
        self.log_enabled = log_enabled  # write the delivery log (see store.log)
        self.group_commit = GroupCommit(pool, log_enabled)
        self.commit_check_time = commit_check_time

    @classmethod
    async def connect(
        cls,
        dsn: str,
        max_size: int = 20,
        migrate: bool = True,
        commit_check_time: float = COMMIT_CHECK_TIME,
        log_enabled: bool = True,
    ) -> Store:
        """``max_size`` connections for the queue's work, and up to a quarter as many more
        (opened only when used) for the chunks of big messages being received;
        ``commit_check_time``: see :class:`IntakeTransaction`'s ``commit``; ``log_enabled``:
        write the delivery log."""
        pool = await asyncpg.create_pool(dsn, min_size=1, max_size=max_size, reset=_keep_session)
        chunk_pool = await asyncpg.create_pool(
            dsn,
            min_size=0,
            max_size=max(1, max_size // 4),
            reset=_keep_session,
            server_settings={"synchronous_commit": "off"},
        )
        store = cls(pool, chunk_pool, commit_check_time, log_enabled)
        if migrate:
            await store.migrate()
        return store

    async def close(self) -> None:
        await self.chunk_pool.close()
        await self.pool.close()

    async def migrate(self) -> int:
        """Bring the schema to the newest version; safe to run from many processes at once."""
        return await schema.migrate(self.pool)


async def _keep_session(conn: asyncpg.Connection) -> None:
    """What the pool does to a connection it takes back, beyond ending an open transaction:
    nothing. asyncpg's default sends ``RESET ALL``, ``UNLISTEN *``, ``CLOSE ALL`` and an
    advisory-unlock, a round trip on every release, for session state the store never
    leaves behind (it sets only ``SET LOCAL`` settings, takes only transaction-scoped
    advisory locks, listens to nothing and keeps cursors inside transactions)."""
