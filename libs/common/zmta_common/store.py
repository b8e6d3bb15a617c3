"""The queue's system of record in PostgreSQL: messages, body chunks, deliveries, suppressions.

Every query of the project lives here, behind :class:`Store`, so the store can be
swapped (MongoDB's place in the original). The rules it keeps:

* Intake: the message row and one delivery row per recipient become visible together
  or not at all, with every chunk of the body already stored (:class:`IntakeTransaction`).
* Leasing takes ready rows with ``FOR UPDATE SKIP LOCKED`` and stamps them with a
  lease token and an expiry; an expired lease makes the row ready again, so a
  crashed sender's work is done again (at-least-once, never lost).
* A delivered or rejected row is deleted; the message and its chunks go with the
  last row of the message (under a lock on the message row, so two last rows
  finishing at once cannot both leave it behind).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import asyncpg
from asyncpg.pool import PoolConnectionProxy

from .domains import canonical_address, canonical_domain
from .ids import new_object_id

log = logging.getLogger(__name__)

Connection = asyncpg.Connection | PoolConnectionProxy


async def _canonical_domains(conn: Connection) -> None:
    """Domains and suppressed addresses written before every key took the one canonical
    form of :mod:`zmta_common.domains` (international names as A-labels): rewritten in
    place. Only rows with non-ASCII text can differ; an entry whose canonical form
    exists already is a duplicate and goes."""
    for found in await conn.fetch(
        "SELECT DISTINCT domain FROM deliveries WHERE octet_length(domain) <> length(domain)"
    ):
        await conn.execute("UPDATE deliveries SET domain = $2 WHERE domain = $1", found[0], canonical_domain(found[0]))
    for row in await conn.fetch("SELECT zone, domain FROM pauses WHERE octet_length(domain) <> length(domain)"):
        await conn.execute(
            "INSERT INTO pauses (zone, domain, created) SELECT zone, $3, created FROM pauses"
            " WHERE zone = $1 AND domain = $2 ON CONFLICT DO NOTHING",
            row["zone"],
            row["domain"],
            canonical_domain(row["domain"]),
        )
        await conn.execute("DELETE FROM pauses WHERE zone = $1 AND domain = $2", row["zone"], row["domain"])
    for row in await conn.fetch(
        "SELECT id, address, domain FROM suppressions"
        " WHERE octet_length(coalesce(address, domain)) <> length(coalesce(address, domain))"
        "    OR coalesce(address, domain) <> lower(coalesce(address, domain))"
    ):
        address = canonical_address(row["address"]) if row["address"] else None
        domain = canonical_domain(row["domain"]) if row["domain"] else None
        taken = await conn.fetchval(
            "SELECT 1 FROM suppressions WHERE id <> $1 AND (address = $2 OR domain = $3)", row["id"], address, domain
        )
        if taken:
            await conn.execute("DELETE FROM suppressions WHERE id = $1", row["id"])
        else:
            await conn.execute(
                "UPDATE suppressions SET address = $2, domain = $3 WHERE id = $1", row["id"], address, domain
            )


Migration = str | Callable[[Connection], Awaitable[None]]

# Each entry migrates from version i to i + 1: SQL, or a function for what SQL cannot
# compute. Append only; never edit a shipped one.
MIGRATIONS: list[Migration] = [
    """
    CREATE TABLE messages (
        id          text PRIMARY KEY,
        created     timestamptz NOT NULL DEFAULT now(),
        mail_from   text NOT NULL,
        headers     bytea NOT NULL,
        body_size   bigint NOT NULL,
        meta        jsonb NOT NULL
    );
    CREATE TABLE message_chunks (
        message_id  text NOT NULL REFERENCES messages(id) ON DELETE CASCADE
                    DEFERRABLE INITIALLY DEFERRED,
        seq         integer NOT NULL,
        data        bytea NOT NULL,
        PRIMARY KEY (message_id, seq)
    );
    -- Mail bodies are mostly compressed already (base64 images, zip); skip TOAST compression.
    ALTER TABLE message_chunks ALTER COLUMN data SET STORAGE EXTERNAL;
    CREATE TABLE deliveries (
        id              text NOT NULL REFERENCES messages(id) ON DELETE CASCADE
                        DEFERRABLE INITIALLY DEFERRED,
        seq             text NOT NULL,
        zone            text NOT NULL,
        recipient       text NOT NULL,
        domain          text NOT NULL,
        created         timestamptz NOT NULL DEFAULT now(),
        next_attempt    timestamptz NOT NULL DEFAULT now(),
        lease_token     uuid,
        lease_owner     text,
        lease_expires   timestamptz,
        attempts        integer NOT NULL DEFAULT 0,
        first_deferred  timestamptz,
        last_deferred   timestamptz,
        last_response   text,
        PRIMARY KEY (id, seq)
    );
    CREATE INDEX deliveries_ready ON deliveries (zone, next_attempt);
    CREATE TABLE suppressions (
        id       text PRIMARY KEY,
        address  text,
        domain   text,
        created  timestamptz NOT NULL DEFAULT now(),
        CHECK ((address IS NULL) <> (domain IS NULL))
    );
    CREATE UNIQUE INDEX suppressions_address ON suppressions (address) WHERE address IS NOT NULL;
    CREATE UNIQUE INDEX suppressions_domain ON suppressions (domain) WHERE domain IS NOT NULL;
    """,
    # Garbage collection looks for old messages (and through them, old deliveries).
    "CREATE INDEX messages_created ON messages (created);",
    # Paused zones (domain '') and recipient domains within a zone: the queue leases none of them.
    """
    CREATE TABLE pauses (
        zone     text NOT NULL,
        domain   text NOT NULL DEFAULT '',
        created  timestamptz NOT NULL DEFAULT now(),
        PRIMARY KEY (zone, domain)
    );
    """,
    _canonical_domains,
]

# Picks which ready (id, seq, domain) candidates to lease: their positions in the list.
Admit = Callable[[list[tuple[str, str, str]]], Awaitable[list[int]]]

# Any constant: it only has to be the same for every process that migrates.
_MIGRATION_LOCK = 0x7A6D7461


@dataclass(slots=True)
class NewDelivery:
    seq: str
    zone: str
    recipient: str
    domain: str


@dataclass(slots=True)
class NewMessage:
    id: str
    mail_from: str
    headers: bytes
    body_size: int
    meta: dict[str, Any]
    deliveries: list[NewDelivery]
    not_before: datetime | None = None


@dataclass(slots=True)
class Lease:
    id: str
    seq: str
    recipient: str
    domain: str
    mail_from: str
    attempts: int
    lease_token: str
    lease_expires: datetime


@dataclass(slots=True)
class StoredMessage:
    id: str
    mail_from: str
    headers: bytes
    body_size: int
    meta: dict[str, Any]
    created: datetime
    chunks: list[bytes] = field(default_factory=list)


@dataclass(slots=True)
class DeliveryRow:
    id: str
    seq: str
    zone: str
    recipient: str
    domain: str
    created: datetime
    next_attempt: datetime
    leased: bool
    attempts: int
    first_deferred: datetime | None
    last_deferred: datetime | None
    last_response: str | None
    lease_owner: str | None = None  # who holds the lease (a sender's name), while ``leased``
    lease_expires: datetime | None = None  # when that lease runs out, while ``leased``


@dataclass(slots=True)
class AttemptHistory:
    attempts: int  # earlier deferrals
    created: datetime  # when the delivery was queued
    last_deferred: datetime | None  # the previous failed attempt, if any


@dataclass(slots=True)
class QueueCounts:
    """Ready (``queued``) and waiting-for-retry (``deferred``) rows of one zone."""

    queued: int = 0
    deferred: int = 0


@dataclass(slots=True)
class OutcomeBatch:
    """Results to apply in one transaction. Tuples are (id, seq, lease_token)."""

    delivered: list[tuple[str, str]] = field(default_factory=list)
    deferred: list[tuple[str, str, str, datetime, str]] = field(default_factory=list)
    rejected: list[tuple[str, str, str]] = field(default_factory=list)


@dataclass(slots=True)
class QueuedRow:
    """A delivery as the api lists it."""

    id: str
    seq: str
    zone: str
    recipient: str
    created: datetime
    next_attempt: datetime
    attempts: int


@dataclass(slots=True)
class Pause:
    """A paused zone (``domain`` None) or recipient domain within a zone."""

    zone: str
    domain: str | None
    created: datetime


# Sort keys of list_queued: the columns ordered by, after the zone filter.
_QUEUED_SORT = {"id": ("id", "seq"), "created": ("created", "id", "seq"), "queued": ("next_attempt", "id", "seq")}


# One-chunk messages, one or many at once (group commit): every message row, chunk and
# delivery in ONE statement, so one round trip and one WAL flush for all of them.
# Suppressed recipients (checked in the same statement) get no delivery row.
_INTAKE_BATCH = """
    WITH message AS (
        INSERT INTO messages (id, mail_from, headers, body_size, meta)
        SELECT * FROM unnest($1::text[], $2::text[], $3::bytea[], $4::bigint[], $5::jsonb[])
    ), chunk AS (
        INSERT INTO message_chunks (message_id, seq, data)
        SELECT t.id, 0, t.data FROM unnest($1::text[], $6::bytea[]) AS t(id, data) WHERE t.data IS NOT NULL
    )
    INSERT INTO deliveries (id, seq, zone, recipient, domain, next_attempt)
    SELECT t.id, t.seq, t.zone, t.recipient, t.domain, coalesce(t.not_before, now())
      FROM unnest($7::text[], $8::text[], $9::text[], $10::text[], $11::text[], $12::timestamptz[], $13::text[])
           AS t(id, seq, zone, recipient, domain, not_before, address_key)
     WHERE NOT EXISTS (
           SELECT 1 FROM suppressions s WHERE s.address = t.address_key OR s.domain = t.domain)
    RETURNING id, seq
"""

# A bigger message, whose leading chunks are stored already: its placeholder row
# completed, with its last chunk and its deliveries. If garbage collection took the row,
# the deferred foreign keys fail the commit.
_COMPLETE_ROWS = """
    WITH message AS (
        UPDATE messages SET mail_from = $2, headers = $3, body_size = $4, meta = $5::jsonb, created = now()
         WHERE id = $1
    ), chunk AS (
        INSERT INTO message_chunks (message_id, seq, data) SELECT $1, $6, $7 WHERE $7::bytea IS NOT NULL
    )
    INSERT INTO deliveries (id, seq, zone, recipient, domain, next_attempt)
    SELECT $1, t.seq, t.zone, t.recipient, t.domain, coalesce($12::timestamptz, now())
      FROM unnest($8::text[], $9::text[], $10::text[], $11::text[], $13::text[])
           AS t(seq, zone, recipient, domain, address_key)
     WHERE NOT EXISTS (
           SELECT 1 FROM suppressions s WHERE s.address = t.address_key OR s.domain = t.domain)
    RETURNING seq
"""

# The first chunk of a message that needs more than one: under a placeholder row, which
# has no deliveries (so nothing sees it) until the message is complete.
_FIRST_CHUNK = """
    WITH message AS (
        INSERT INTO messages (id, mail_from, headers, body_size, meta) VALUES ($1, '', '', 0, '{}')
    )
    INSERT INTO message_chunks (message_id, seq, data) VALUES ($1, 0, $2)
"""
# A later chunk. It renews the placeholder's creation time, so that garbage collection of
# orphans (queue.orphan_age) never takes an upload that is still going on.
_NEXT_CHUNK = """
    WITH message AS (UPDATE messages SET created = now() WHERE id = $1 RETURNING id)
    INSERT INTO message_chunks (message_id, seq, data) SELECT id, $2, $3 FROM message
"""


class IntakeLost(RuntimeError):
    """The stored part of a message being received is gone (garbage collection took it)."""


class IntakeTransaction:
    """One message being written: nothing of it is seen by the queue before :meth:`commit`.

    A message of one chunk (most mail) is stored by :meth:`commit` in a single statement:
    last chunk, message row and delivery rows together.

    A bigger message has its leading chunks written as they arrive, each by one statement
    that commits by itself, on a connection taken for that write alone, under a
    placeholder message row without deliveries; :meth:`commit` then completes the row and
    adds the deliveries in one transaction. So a client that sends slowly holds no database
    connection while it is slow, only while one of its chunks is written. The chunk writes
    go through a pool of their own whose sessions commit without waiting for their WAL
    flush (``synchronous_commit`` off), so a chunk costs one round trip: the final commit
    waits for the WAL up to itself, and so for every chunk before it. A message
    abandoned part-way is deleted by :meth:`rollback`, or, if this process dies first, left
    as an orphan for the queue's garbage collection.
    """

    def __init__(
        self, pool: asyncpg.Pool, chunk_pool: asyncpg.Pool, message_id: str, group: GroupCommit | None = None
    ) -> None:
        self._pool = pool
        self._chunk_pool = chunk_pool  # sessions with synchronous_commit off
        self._group = group
        self.message_id = message_id
        self._next_seq = 0

    async def write_chunk(self, data: bytes) -> None:
        """Write a body chunk that is not the last one."""
        if self._next_seq == 0:
            await self._chunk_pool.execute(_FIRST_CHUNK, self.message_id, data)
        else:
            status = await self._chunk_pool.execute(_NEXT_CHUNK, self.message_id, self._next_seq, data)
            if status.split()[-1] != "1":
                raise IntakeLost(f"message {self.message_id} was removed while it was being received")
        self._next_seq += 1

    async def written_chunks(self) -> AsyncIterator[bytes]:
        """The chunks written so far, streamed in order by one cursor."""
        if self._next_seq == 0:
            return
        read = 0
        async with self._pool.acquire() as conn, conn.transaction():
            query = "SELECT data FROM message_chunks WHERE message_id = $1 AND seq < $2 ORDER BY seq"
            async for row in conn.cursor(query, self.message_id, self._next_seq, prefetch=4):
                read += 1
                yield row["data"]
        if read < self._next_seq:
            raise IntakeLost(f"message {self.message_id} was removed while it was being received")

    async def commit(self, message: NewMessage, last_chunk: bytes | None) -> set[str]:
        """Write the last chunk (if any) with the rows, and make it all visible at once.

        Recipients on the suppression list get no delivery row; returns the seqs that got
        one. When none did, nothing of the message is kept.

        A commit can fail after it went through: the connection lost while the server was
        committing, or a retry of it finding the message already there. The message is then
        looked for before the failure is passed on, so that a client is not told to send
        again what is queued already (it would be delivered twice).
        """
        try:
            return await self._commit(message, last_chunk)
        except _UNCERTAIN as exc:
            kept = await _committed_anyway(self._pool, message.id)
            if kept is None:
                raise
            log.warning("commit failed but went through", extra={"id": message.id, "error": repr(exc)})
            self._next_seq = 0
            return kept

    async def _commit(self, message: NewMessage, last_chunk: bytes | None) -> set[str]:
        if self._next_seq == 0:
            if self._group is not None:
                return await self._group.commit(message, last_chunk)
            return await _commit_one(self._pool, message, last_chunk)
        try:
            async with self._pool.acquire() as conn, conn.transaction():
                rows = await conn.fetch(_COMPLETE_ROWS, *_row_args(message, self._next_seq, last_chunk))
                if not rows:
                    await conn.execute("DELETE FROM messages WHERE id = $1", message.id)
        except asyncpg.ForeignKeyViolationError:
            raise IntakeLost(f"message {message.id} was removed while it was being received") from None
        self._next_seq = 0  # committed: nothing left for rollback() to remove
        return {r["seq"] for r in rows}

    async def rollback(self) -> None:
        """Remove what was written of the message (nothing if it never needed a write)."""
        if self._next_seq == 0:
            return
        self._next_seq = 0
        # The server may be gone: the orphan is then garbage-collected later.
        with contextlib.suppress(asyncpg.PostgresError, OSError, asyncpg.InterfaceError):
            await self._pool.execute("DELETE FROM messages WHERE id = $1", self.message_id)


# Failures after which a commit may have gone through all the same.
_UNCERTAIN = (
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.UniqueViolationError,  # a retry found the message: the first try went through
    ConnectionError,
    OSError,
    asyncio.TimeoutError,
)
COMMIT_CHECK_TIME = 10.0  # seconds spent finding out, while the server comes back


async def _committed_anyway(pool: asyncpg.Pool, message_id: str) -> set[str] | None:
    """The seqs of a message's deliveries if the message is queued (None if it is not, or
    if the server cannot say within COMMIT_CHECK_TIME)."""
    deadline = time.monotonic() + COMMIT_CHECK_TIME
    while True:
        try:
            rows = await pool.fetch(
                "SELECT d.seq FROM messages m JOIN deliveries d ON d.id = m.id WHERE m.id = $1", message_id
            )
            return {r["seq"] for r in rows} or None
        except _UNCERTAIN:
            if time.monotonic() >= deadline:
                return None
            await asyncio.sleep(0.5)


async def _commit_one(pool: asyncpg.Pool, message: NewMessage, last_chunk: bytes | None) -> set[str]:
    """A message of one chunk; the seqs that got a delivery."""
    kept = await _insert_messages(pool, [(message, last_chunk)])
    return kept.get(message.id, set())


async def _insert_messages(pool: asyncpg.Pool, items: list[tuple[NewMessage, bytes | None]]) -> dict[str, set[str]]:
    """One-chunk messages in one statement (atomic by itself): message id -> seqs kept.
    A message whose every recipient is suppressed is taken back out."""
    messages = [m for m, _ in items]
    deliveries = [(m, d) for m in messages for d in m.deliveries]
    rows = await pool.fetch(
        _INTAKE_BATCH,
        [m.id for m in messages],
        [m.mail_from for m in messages],
        [m.headers for m in messages],
        [m.body_size for m in messages],
        [json.dumps(m.meta) for m in messages],
        [chunk for _, chunk in items],
        [m.id for m, _ in deliveries],
        [d.seq for _, d in deliveries],
        [d.zone for _, d in deliveries],
        [d.recipient for _, d in deliveries],
        [d.domain for _, d in deliveries],
        [m.not_before for m, _ in deliveries],
        [canonical_address(d.recipient) for _, d in deliveries],
    )
    kept: dict[str, set[str]] = {}
    for row in rows:
        kept.setdefault(row["id"], set()).add(row["seq"])
    unkept = [m.id for m in messages if m.id not in kept]
    if unkept:  # every recipient suppressed (rare)
        await pool.execute("DELETE FROM messages WHERE id = ANY($1::text[])", unkept)
    return kept


def _row_args(message: NewMessage, chunk_seq: int, last_chunk: bytes | None) -> tuple[object, ...]:
    """The parameters of _COMPLETE_ROWS."""
    return (
        message.id,
        message.mail_from,
        message.headers,
        message.body_size,
        json.dumps(message.meta),
        chunk_seq,
        last_chunk,
        [d.seq for d in message.deliveries],
        [d.zone for d in message.deliveries],
        [d.recipient for d in message.deliveries],
        [d.domain for d in message.deliveries],
        message.not_before,
        [canonical_address(d.recipient) for d in message.deliveries],
    )


@dataclass(slots=True)
class _Waiting:
    message: NewMessage
    last_chunk: bytes | None
    done: asyncio.Future[set[str]]


class GroupCommit:
    """Commits the one-chunk messages of many sessions together (as PostgreSQL's own group
    commit does for WAL): while a batch is being written, the messages that finish meanwhile
    wait, and go together in the next one, in one statement. An idle server writes a message
    at once; a busy one pays one round trip and one WAL flush per batch, not per message.
    Each caller returns only once its own message is committed. If a batch fails, its
    messages are written one by one, so one message the database refuses fails alone."""

    MAX_BATCH = 200

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool
        self._waiting: list[_Waiting] = []
        self._writer: asyncio.Task[None] | None = None
        self.batches = 0  # statements that wrote more than one message

    async def commit(self, message: NewMessage, last_chunk: bytes | None) -> set[str]:
        done: asyncio.Future[set[str]] = asyncio.get_running_loop().create_future()
        self._waiting.append(_Waiting(message, last_chunk, done))
        if self._writer is None or self._writer.done():
            self._writer = asyncio.create_task(self._write_all())
        # Shielded: a client that goes away does not take the others' batch down with it.
        return await asyncio.shield(done)

    async def _write_all(self) -> None:
        while self._waiting:
            batch, self._waiting = self._waiting[: self.MAX_BATCH], self._waiting[self.MAX_BATCH :]
            if len(batch) == 1:
                await self._write_alone(batch[0])
                continue
            try:
                kept = await self._write_batch(batch)
            except Exception:  # each message is tried again alone, and fails alone
                for waiting in batch:
                    await self._write_alone(waiting)
                continue
            for waiting in batch:
                _settle(waiting.done, kept.get(waiting.message.id, set()))

    async def _write_alone(self, waiting: _Waiting) -> None:
        try:
            _settle(waiting.done, await _commit_one(self._pool, waiting.message, waiting.last_chunk))
        except Exception as exc:  # handed to the caller
            if not waiting.done.done():
                waiting.done.set_exception(exc)

    async def _write_batch(self, batch: list[_Waiting]) -> dict[str, set[str]]:
        self.batches += 1
        return await _insert_messages(self._pool, [(w.message, w.last_chunk) for w in batch])


def _settle(done: asyncio.Future[set[str]], kept: set[str]) -> None:
    if not done.done():
        done.set_result(kept)


class Store:
    def __init__(self, pool: asyncpg.Pool, chunk_pool: asyncpg.Pool) -> None:
        self.pool = pool
        self.chunk_pool = chunk_pool  # the leading chunks of big messages (see IntakeTransaction)
        self.group_commit = GroupCommit(pool)

    @classmethod
    async def connect(cls, dsn: str, max_size: int = 20, migrate: bool = True) -> Store:
        """``max_size`` connections for the queue's work, and up to a quarter as many more
        (opened only when used) for the chunks of big messages being received."""
        pool = await asyncpg.create_pool(dsn, min_size=1, max_size=max_size, reset=_keep_session)
        chunk_pool = await asyncpg.create_pool(
            dsn,
            min_size=0,
            max_size=max(1, max_size // 4),
            reset=_keep_session,
            server_settings={"synchronous_commit": "off"},
        )
        store = cls(pool, chunk_pool)
        if migrate:
            await store.migrate()
        return store

    async def close(self) -> None:
        await self.chunk_pool.close()
        await self.pool.close()

    async def migrate(self) -> int:
        """Bring the schema to the newest version; safe to run from many processes at once."""
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", _MIGRATION_LOCK)
            await conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version integer NOT NULL)")
            current = await conn.fetchval("SELECT max(version) FROM schema_version") or 0
            for version in range(current, len(MIGRATIONS)):
                step = MIGRATIONS[version]
                await (conn.execute(step) if isinstance(step, str) else step(conn))
                await conn.execute("INSERT INTO schema_version VALUES ($1)", version + 1)
            return len(MIGRATIONS)

    # -- intake --------------------------------------------------------------

    def begin_intake(self, message_id: str) -> IntakeTransaction:
        return IntakeTransaction(self.pool, self.chunk_pool, message_id, self.group_commit)

    # -- leasing -------------------------------------------------------------

    async def lease(
        self,
        zone: str,
        limit: int,
        lease_time: float,
        owner: str,
        skip_domains: Sequence[str] = (),
        admit: Admit | None = None,
        scan: int | None = None,
    ) -> list[Lease]:
        """Lease up to ``limit`` ready deliveries of ``zone`` for ``lease_time`` seconds.

        ``skip_domains`` are left out of the query. ``admit``, when given, sees up to
        ``scan`` ready candidates (while they are locked) and returns the positions of
        those to lease.
        """
        token = uuid.uuid4()
        async with self.pool.acquire() as conn, conn.transaction():
            ready = await conn.fetch(
                "SELECT id, seq, domain FROM deliveries"
                " WHERE zone = $1 AND next_attempt <= now()"
                " AND (lease_expires IS NULL OR lease_expires < now()) AND domain <> ALL($3::text[])"
                " ORDER BY next_attempt LIMIT $2 FOR UPDATE SKIP LOCKED",
                zone,
                limit if admit is None else max(limit, scan or limit * 4),
                list(skip_domains),
            )
            if admit is not None and ready:
                ready = [ready[i] for i in await admit([(r["id"], r["seq"], r["domain"]) for r in ready])]
            if not ready:
                return []
            rows = await conn.fetch(
                """
                UPDATE deliveries d
                   SET lease_token = $3, lease_owner = $4, lease_expires = now() + make_interval(secs => $5)
                  FROM unnest($1::text[], $2::text[]) AS r(id, seq), messages m
                 WHERE d.id = r.id AND d.seq = r.seq AND m.id = d.id
                RETURNING d.id, d.seq, d.recipient, d.domain, m.mail_from, d.attempts, d.lease_token, d.lease_expires
                """,
                [r["id"] for r in ready],
                [r["seq"] for r in ready],
                token,
                owner,
                lease_time,
            )
        return [_lease(r) for r in rows]

    async def release_expired_leases(self) -> int:
        """Clear leases whose time is up (leasing ignores them anyway; this keeps status honest)."""
        result = await self.pool.execute(
            "UPDATE deliveries SET lease_token = NULL, lease_owner = NULL, lease_expires = NULL"
            " WHERE lease_expires < now()"
        )
        return int(result.split()[-1])

    async def release_leases(self, leases: Sequence[tuple[str, str, str]]) -> int:
        """Give back leases a sender will not finish (it is stopping): the rows are ready
        again at once, with no attempt counted. Tuples are (id, seq, lease_token); a row
        whose lease has changed hands since is left alone. Returns the rows released."""
        if not leases:
            return 0
        result = await self.pool.execute(
            "UPDATE deliveries d SET lease_token = NULL, lease_owner = NULL, lease_expires = NULL"
            " FROM unnest($1::text[], $2::text[], $3::uuid[]) AS r(id, seq, token)"
            " WHERE d.id = r.id AND d.seq = r.seq AND d.lease_token = r.token",
            *_lease_arrays(leases),
        )
        return int(result.split()[-1])

    async def renew_leases(self, leases: Sequence[tuple[str, str, str]], lease_time: float) -> set[tuple[str, str]]:
        """Extend leases a sender is still working on to ``lease_time`` seconds from now, so
        that a long delivery is not leased to another sender as well. Tuples are (id, seq,
        lease_token); a lease that has changed hands is left alone. Returns the (id, seq) of
        the rows renewed."""
        if not leases:
            return set()
        rows = await self.pool.fetch(
            "UPDATE deliveries d SET lease_expires = now() + make_interval(secs => $4)"
            " FROM unnest($1::text[], $2::text[], $3::uuid[]) AS r(id, seq, token)"
            " WHERE d.id = r.id AND d.seq = r.seq AND d.lease_token = r.token RETURNING d.id, d.seq",
            *_lease_arrays(leases),
            lease_time,
        )
        return {(r["id"], r["seq"]) for r in rows}

    async def leased_recipient(self, message_id: str, seq: str, token: str) -> str | None:
        """The recipient of a delivery while ``token`` still holds its lease, else None."""
        recipient: str | None = await self.pool.fetchval(
            "SELECT recipient FROM deliveries WHERE id = $1 AND seq = $2 AND lease_token = $3",
            message_id,
            seq,
            uuid.UUID(token),
        )
        return recipient

    # -- outcomes ------------------------------------------------------------

    async def apply_outcomes(self, batch: OutcomeBatch) -> set[tuple[str, str]]:
        """Apply a batch of results in one transaction; return the (id, seq) of the rows it
        changed: a result applied before (a redelivered report) or too late changes none.

        Delivered rows go whatever their lease token (the mail *was* delivered); deferred
        and rejected rows change only while the reporter still holds the lease.
        """
        applied: set[tuple[str, str]] = set()
        ids = sorted({d[0] for d in batch.delivered} | {d[0] for d in batch.deferred} | {d[0] for d in batch.rejected})
        if not ids:
            return applied
        async with self.pool.acquire() as conn, conn.transaction():
            # Lock the messages first, in id order, so concurrent appliers cannot deadlock
            # and exactly one of them sees the last row of a message go.
            await conn.execute("SELECT 1 FROM messages WHERE id = ANY($1::text[]) ORDER BY id FOR UPDATE", ids)
            if batch.delivered:
                rows = await conn.fetch(
                    "DELETE FROM deliveries d USING unnest($1::text[], $2::text[]) AS r(id, seq)"
                    " WHERE d.id = r.id AND d.seq = r.seq RETURNING d.id, d.seq",
                    [d[0] for d in batch.delivered],
                    [d[1] for d in batch.delivered],
                )
                applied.update((r["id"], r["seq"]) for r in rows)
            if batch.rejected:
                rows = await conn.fetch(
                    "DELETE FROM deliveries d"
                    " USING unnest($1::text[], $2::text[], $3::uuid[]) AS r(id, seq, token)"
                    " WHERE d.id = r.id AND d.seq = r.seq AND d.lease_token = r.token"
                    " RETURNING d.id, d.seq",
                    [d[0] for d in batch.rejected],
                    [d[1] for d in batch.rejected],
                    [uuid.UUID(d[2]) for d in batch.rejected],
                )
                applied.update((r["id"], r["seq"]) for r in rows)
            if batch.deferred:
                rows = await conn.fetch(
                    """
                    UPDATE deliveries d
                       SET next_attempt = r.next_attempt, attempts = d.attempts + 1,
                           first_deferred = coalesce(d.first_deferred, now()),
                           last_deferred = now(), last_response = r.response,
                           lease_token = NULL, lease_owner = NULL, lease_expires = NULL
                      FROM unnest($1::text[], $2::text[], $3::uuid[], $4::timestamptz[],
                                  $5::text[]) AS r(id, seq, token, next_attempt, response)
                     WHERE d.id = r.id AND d.seq = r.seq AND d.lease_token = r.token
                    RETURNING d.id, d.seq
                    """,
                    [d[0] for d in batch.deferred],
                    [d[1] for d in batch.deferred],
                    [uuid.UUID(d[2]) for d in batch.deferred],
                    [d[3] for d in batch.deferred],
                    [d[4] for d in batch.deferred],
                )
                applied.update((r["id"], r["seq"]) for r in rows)
            await conn.execute(
                "DELETE FROM messages m WHERE m.id = ANY($1::text[])"
                " AND NOT EXISTS (SELECT 1 FROM deliveries d WHERE d.id = m.id)",
                ids,
            )
        return applied

    async def delivery_attempts(self, keys: Sequence[tuple[str, str]]) -> dict[tuple[str, str], AttemptHistory]:
        """How often, and since when, each (id, seq) still in the queue has failed."""
        rows = await self.pool.fetch(
            "SELECT d.id, d.seq, d.attempts, d.created, d.last_deferred FROM deliveries d"
            " JOIN unnest($1::text[], $2::text[]) AS r(id, seq) ON d.id = r.id AND d.seq = r.seq",
            [k[0] for k in keys],
            [k[1] for k in keys],
        )
        return {(r["id"], r["seq"]): AttemptHistory(r["attempts"], r["created"], r["last_deferred"]) for r in rows}

    # -- garbage collection --------------------------------------------------

    async def remove_orphan_messages(self, older_than: float) -> int:
        """Remove messages (and their bodies) that have no delivery left and are older
        than ``older_than`` seconds; younger ones may still be on their way in."""
        result = await self.pool.execute(
            "DELETE FROM messages m WHERE m.created < now() - make_interval(secs => $1)"
            " AND NOT EXISTS (SELECT 1 FROM deliveries d WHERE d.id = m.id)",
            older_than,
        )
        return int(result.split()[-1])

    async def lease_expired(self, zone: str, max_age: float, limit: int, owner: str) -> list[Lease]:
        """Lease deliveries of ``zone`` queued more than ``max_age`` seconds ago that no
        sender holds, so that they can be reported rejected like any other delivery."""
        token = uuid.uuid4()
        rows = await self.pool.fetch(
            """
            UPDATE deliveries d
               SET lease_token = $4, lease_owner = $5, lease_expires = now() + interval '10 minutes'
              FROM messages m
             WHERE m.id = d.id AND (d.id, d.seq) IN (
                   SELECT x.id, x.seq FROM messages o JOIN deliveries x ON x.id = o.id
                    WHERE o.created < now() - make_interval(secs => $2) AND x.zone = $1
                      AND (x.lease_expires IS NULL OR x.lease_expires < now())
                    LIMIT $3 FOR UPDATE OF x SKIP LOCKED)
            RETURNING d.id, d.seq, d.recipient, d.domain, m.mail_from, d.attempts, d.lease_token, d.lease_expires
            """,
            zone,
            max_age,
            limit,
            token,
            owner,
        )
        return [_lease(r) for r in rows]

    # -- reading -------------------------------------------------------------

    async def get_message(self, message_id: str, prefetch: int = 0) -> StoredMessage | None:
        """The message row, with its first ``prefetch`` body chunks in ``chunks``."""
        return (await self.get_messages([message_id], prefetch))[0]

    async def get_messages(self, message_ids: Sequence[str], prefetch: int = 0) -> list[StoredMessage | None]:
        """Like :meth:`get_message` for many at once, in one query: one entry per id asked
        for, in order (None where gone). An id asked for twice gets two objects, as two
        calls would give (a plugin may change one delivery's copy)."""
        rows = await self.pool.fetch(
            "SELECT m.id, m.mail_from, m.headers, m.body_size, m.meta, m.created,"
            " ARRAY(SELECT c.data FROM message_chunks c WHERE c.message_id = m.id ORDER BY c.seq LIMIT $2)"
            " AS chunks FROM messages m WHERE m.id = ANY($1::text[])",
            list(set(message_ids)),
            prefetch,
        )
        by_id = {row["id"]: row for row in rows}
        return [_stored_message(by_id[i]) if i in by_id else None for i in message_ids]

    async def iter_body(self, message_id: str, start: int = 0, batch: int = 2) -> AsyncIterator[bytes]:
        """Yield the body chunks from number ``start`` on, ``batch`` per query, no connection held between."""
        next_seq = start
        while True:
            rows = await self.pool.fetch(
                "SELECT seq, data FROM message_chunks WHERE message_id = $1 AND seq >= $2 ORDER BY seq LIMIT $3",
                message_id,
                next_seq,
                batch,
            )
            for row in rows:
                yield bytes(row["data"])
            if len(rows) < batch:
                return
            next_seq = rows[-1]["seq"] + 1

    async def body(self, message: StoredMessage, prefetched: int) -> AsyncIterator[bytes]:
        """The whole body of a message read with ``get_message(id, prefetched)``."""
        for chunk in message.chunks:
            yield chunk
        # (The chunks add up to body_size: a message whose prefetch held all of it needs no query.)
        if len(message.chunks) == prefetched and sum(map(len, message.chunks)) < message.body_size:
            async for chunk in self.iter_body(message.id, start=prefetched):
                yield chunk

    async def deliveries_of(self, message_id: str) -> list[DeliveryRow]:
        rows = await self.pool.fetch(
            "SELECT id, seq, zone, recipient, domain, created, next_attempt,"
            " (lease_expires IS NOT NULL AND lease_expires > now()) AS leased, attempts,"
            " first_deferred, last_deferred, last_response,"
            " CASE WHEN lease_expires > now() THEN lease_owner END AS lease_owner,"
            " CASE WHEN lease_expires > now() THEN lease_expires END AS lease_expires"
            " FROM deliveries WHERE id = $1 ORDER BY seq",
            message_id,
        )
        return [DeliveryRow(**dict(r)) for r in rows]

    async def queue_counts(self) -> dict[str, QueueCounts]:
        rows = await self.pool.fetch(
            "SELECT zone, count(*) FILTER (WHERE next_attempt <= now()) AS queued,"
            " count(*) FILTER (WHERE next_attempt > now()) AS deferred"
            " FROM deliveries GROUP BY zone"
        )
        return {r["zone"]: QueueCounts(r["queued"], r["deferred"]) for r in rows}

    async def domain_counts(self, zone: str | None) -> list[tuple[str, str, int, int]]:
        """(zone, domain, queued, deferred) for one zone or all of them."""
        rows = await self.pool.fetch(
            "SELECT zone, domain, count(*) FILTER (WHERE next_attempt <= now()) AS queued,"
            " count(*) FILTER (WHERE next_attempt > now()) AS deferred"
            " FROM deliveries WHERE $1::text IS NULL OR zone = $1"
            " GROUP BY zone, domain ORDER BY zone, domain",
            zone,
        )
        return [(r["zone"], r["domain"], r["queued"], r["deferred"]) for r in rows]

    # -- suppression list ----------------------------------------------------

    async def add_suppression(self, *, address: str | None = None, domain: str | None = None) -> dict[str, Any]:
        """Suppress an address or a whole domain (in their canonical forms, see
        :mod:`zmta_common.domains`); adding one twice returns the first entry."""
        address = canonical_address(address) if address else None
        domain = canonical_domain(domain) if domain else None
        row = await self.pool.fetchrow(
            "INSERT INTO suppressions (id, address, domain) VALUES ($1, $2, $3)"
            " ON CONFLICT DO NOTHING RETURNING id, address, domain, created",
            new_object_id(),
            address,
            domain,
        )
        if row is None:
            row = await self.pool.fetchrow(
                "SELECT id, address, domain, created FROM suppressions WHERE address = $1 OR domain = $2",
                address,
                domain,
            )
        assert row is not None
        return _suppression(row)

    async def list_suppressions(self) -> list[dict[str, Any]]:
        rows = await self.pool.fetch("SELECT id, address, domain, created FROM suppressions ORDER BY created DESC, id")
        return [_suppression(r) for r in rows]

    async def delete_suppression(self, entry_id: str) -> bool:
        return (await self.pool.execute("DELETE FROM suppressions WHERE id = $1", entry_id)) != "DELETE 0"

    # -- administration (api) ------------------------------------------------

    async def list_queued(
        self,
        zone: str,
        deferred: bool,
        sort: str = "id",
        descending: bool = True,
        offset: int = 0,
        limit: int = 1000,
        after: Sequence[Any] | None = None,
    ) -> list[QueuedRow]:
        """Deliveries of ``zone`` that are ready (or, with ``deferred``, waiting for a later
        attempt), ordered by ``sort`` (id, created or queued; then id and seq). ``after`` is
        the sort key of the last row of the previous page (keyset pagination)."""
        columns = _QUEUED_SORT[sort]
        direction = "DESC" if descending else "ASC"
        where = "zone = $1 AND next_attempt " + ("> now()" if deferred else "<= now()")
        args: list[Any] = [zone, offset, limit]
        if after is not None:
            if len(after) != len(columns):
                raise ValueError("the key does not fit the sort")
            marks = ", ".join(f"${4 + i}" for i in range(len(columns)))
            where += f" AND ({', '.join(columns)}) {'<' if descending else '>'} ({marks})"
            args += list(after)
        order = ", ".join(f"{c} {direction}" for c in columns)
        rows = await self.pool.fetch(
            "SELECT id, seq, zone, recipient, created, next_attempt, attempts FROM deliveries"  # noqa: S608
            f" WHERE {where} ORDER BY {order} OFFSET $2 LIMIT $3",
            *args,
        )
        return [QueuedRow(**dict(r)) for r in rows]

    async def retry_now(self, message_id: str, seq: str | None) -> tuple[str, str | None]:
        """Make a delivery (or, without ``seq``, every delivery of the message) ready at once
        (the original's "send now"), unless a sender holds it.

        Returns ("ready", zone), ("leased", zone) or ("missing", None)."""
        zone = await self.pool.fetchval(
            "WITH ready AS (UPDATE deliveries SET next_attempt = now() WHERE id = $1 AND ($2::text IS NULL OR seq = $2)"
            " AND (lease_expires IS NULL OR lease_expires <= now()) RETURNING zone) SELECT min(zone) FROM ready",
            message_id,
            seq,
        )
        if zone is not None:
            return "ready", zone
        zone = await self.pool.fetchval(
            "SELECT min(zone) FROM deliveries WHERE id = $1 AND ($2::text IS NULL OR seq = $2)", message_id, seq
        )
        return ("leased", zone) if zone is not None else ("missing", None)

    async def drop_deliveries(self, message_id: str, seq: str | None = None) -> tuple[list[tuple[str, str]], int]:
        """Delete the deliveries of a message (all, or the one ``seq``) that no sender holds;
        the message and its body go with its last row. Returns the (seq, zone) removed and
        how many matching rows were left alone because they are leased."""
        async with self.pool.acquire() as conn, conn.transaction():
            # The message row first, as apply_outcomes does: exactly one of them sees the last row go.
            if await conn.fetchval("SELECT 1 FROM messages WHERE id = $1 FOR UPDATE", message_id) is None:
                return [], 0
            removed = await conn.fetch(
                "DELETE FROM deliveries WHERE id = $1 AND ($2::text IS NULL OR seq = $2)"
                " AND (lease_expires IS NULL OR lease_expires <= now()) RETURNING seq, zone",
                message_id,
                seq,
            )
            leased = await conn.fetchval(
                "SELECT count(*) FROM deliveries WHERE id = $1 AND ($2::text IS NULL OR seq = $2)", message_id, seq
            )
            await conn.execute(
                "DELETE FROM messages m WHERE m.id = $1 AND NOT EXISTS (SELECT 1 FROM deliveries d WHERE d.id = m.id)",
                message_id,
            )
        return [(r["seq"], r["zone"]) for r in removed], int(leased)

    async def add_pause(self, zone: str, domain: str | None = None) -> Pause:
        """Pause a zone, or one recipient domain in it; pausing twice keeps the first entry."""
        domain = canonical_domain(domain) if domain else None
        row = None
        while row is None:  # a second try only if a resume removed the entry in between
            row = await self.pool.fetchrow(
                "INSERT INTO pauses (zone, domain) VALUES ($1, $2)"
                " ON CONFLICT DO NOTHING RETURNING zone, domain, created",
                zone,
                domain or "",
            ) or await self.pool.fetchrow(
                "SELECT zone, domain, created FROM pauses WHERE zone = $1 AND domain = $2", zone, domain or ""
            )
        return Pause(row["zone"], row["domain"] or None, row["created"])

    async def remove_pause(self, zone: str, domain: str | None = None) -> bool:
        domain = canonical_domain(domain) if domain else None
        result = await self.pool.execute("DELETE FROM pauses WHERE zone = $1 AND domain = $2", zone, domain or "")
        return result != "DELETE 0"

    async def list_pauses(self) -> list[Pause]:
        rows = await self.pool.fetch("SELECT zone, domain, created FROM pauses ORDER BY zone, domain")
        return [Pause(r["zone"], r["domain"] or None, r["created"]) for r in rows]

    async def row_counts(self) -> dict[str, int]:
        """How many rows each table holds (for tests and diagnostics)."""
        out = {}
        for table in ("messages", "message_chunks", "deliveries"):
            out[table] = await self.pool.fetchval(f"SELECT count(*) FROM {table}")  # noqa: S608
        return out


async def _keep_session(conn: asyncpg.Connection) -> None:
    """What the pool does to a connection it takes back, beyond ending an open transaction:
    nothing. asyncpg's default sends ``RESET ALL``, ``UNLISTEN *``, ``CLOSE ALL`` and an
    advisory-unlock, a round trip on every release, for session state the store never
    leaves behind (it sets only ``SET LOCAL`` settings, takes only transaction-scoped
    advisory locks, listens to nothing and keeps cursors inside transactions)."""


def _lease_arrays(leases: Sequence[tuple[str, str, str]]) -> tuple[list[str], list[str], list[uuid.UUID]]:
    """(id, seq, token) tuples as the three arrays the lease statements unnest."""
    return [lease[0] for lease in leases], [lease[1] for lease in leases], [uuid.UUID(lease[2]) for lease in leases]


def _stored_message(row: asyncpg.Record) -> StoredMessage:
    return StoredMessage(
        id=row["id"],
        mail_from=row["mail_from"],
        headers=bytes(row["headers"]),
        body_size=row["body_size"],
        meta=json.loads(row["meta"]),
        created=row["created"],
        chunks=[bytes(c) for c in row["chunks"]],
    )


def _lease(r: asyncpg.Record) -> Lease:
    return Lease(
        id=r["id"],
        seq=r["seq"],
        recipient=r["recipient"],
        domain=r["domain"],
        mail_from=r["mail_from"],
        attempts=r["attempts"],
        lease_token=str(r["lease_token"]),
        lease_expires=r["lease_expires"],
    )


def _suppression(row: asyncpg.Record) -> dict[str, Any]:
    """An entry in the original's shape: id, created and either address or domain."""
    entry: dict[str, Any] = {"id": row["id"], "created": row["created"].isoformat()}
    if row["address"]:
        entry["address"] = row["address"]
    else:
        entry["domain"] = row["domain"]
    return entry


def utcnow() -> datetime:
    return datetime.now(UTC)
