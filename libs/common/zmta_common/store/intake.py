"""Intake: a message, its body chunks and its deliveries written so that the queue sees
all of them at once or nothing (:class:`IntakeTransaction`), many messages to a commit
(:class:`GroupCommit`)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import asyncpg

from ..domains import canonical_address
from .base import StoreBase
from .records import NewMessage

log = logging.getLogger("zmta_common.store")  # the store's logger, as before it was split


# What the delivery log says of a message at intake (m: its row's values, meta its envelope).
_QUEUED_DETAILS = """jsonb_strip_nulls(jsonb_build_object(
    'interface', m.meta->>'interface', 'client', m.meta->>'origin', 'size', m.body_size,
    'message_id', m.meta->>'messageId', 'user', m.meta->>'user'))"""

# One-chunk messages, one or many at once (group commit): every message row, chunk,
# delivery and delivery log entry in ONE statement, so one round trip and one WAL flush
# for all of them. Suppressed recipients (checked in the same statement) get no delivery
# row, and a DROP entry in the log; $14: whether the log is written.
_INTAKE_BATCH = """
    WITH message AS (
        INSERT INTO messages (id, mail_from, headers, body_size, meta)
        SELECT * FROM unnest($1::text[], $2::text[], $3::bytea[], $4::bigint[], $5::jsonb[])
    ), chunk AS (
        INSERT INTO message_chunks (message_id, seq, data)
        SELECT t.id, 0, t.data FROM unnest($1::text[], $6::bytea[]) AS t(id, data) WHERE t.data IS NOT NULL
    ), wanted AS (
        SELECT t.*, EXISTS (SELECT 1 FROM suppressions s WHERE s.address = t.address_key OR s.domain = t.domain)
               AS suppressed
          FROM unnest($7::text[], $8::text[], $9::text[], $10::text[], $11::text[], $12::timestamptz[], $13::text[])
               AS t(id, seq, zone, recipient, domain, not_before, address_key)
    ), logged AS (
        INSERT INTO delivery_log (action, id, seq, zone, mail_from, recipient, domain, details)
        SELECT CASE WHEN w.suppressed THEN 'DROP' ELSE 'QUEUED' END, w.id, w.seq, w.zone, lower(m.mail_from),
               lower(w.recipient), w.domain,
               QUEUED_DETAILS || CASE WHEN w.suppressed THEN '{"reason": "suppressed"}'::jsonb ELSE '{}' END
          FROM wanted w JOIN unnest($1::text[], $2::text[], $4::bigint[], $5::jsonb[])
               AS m(id, mail_from, body_size, meta) ON m.id = w.id
         WHERE $14::boolean
    )
    INSERT INTO deliveries (id, seq, zone, recipient, domain, next_attempt)
    SELECT id, seq, zone, recipient, domain, coalesce(not_before, now()) FROM wanted WHERE NOT suppressed
    RETURNING id, seq
""".replace("QUEUED_DETAILS", _QUEUED_DETAILS)

# A bigger message, whose leading chunks are stored already: its placeholder row
# completed, with its last chunk, its deliveries and its log entries. If garbage
# collection took the row, the deferred foreign keys fail the commit.
_COMPLETE_ROWS = """
    WITH message AS (
        UPDATE messages SET mail_from = $2, headers = $3, body_size = $4, meta = $5::jsonb, created = now()
         WHERE id = $1
    ), chunk AS (
        INSERT INTO message_chunks (message_id, seq, data) SELECT $1, $6, $7 WHERE $7::bytea IS NOT NULL
    ), wanted AS (
        SELECT t.*, EXISTS (SELECT 1 FROM suppressions s WHERE s.address = t.address_key OR s.domain = t.domain)
               AS suppressed
          FROM unnest($8::text[], $9::text[], $10::text[], $11::text[], $13::text[])
               AS t(seq, zone, recipient, domain, address_key)
    ), logged AS (
        INSERT INTO delivery_log (action, id, seq, zone, mail_from, recipient, domain, details)
        SELECT CASE WHEN w.suppressed THEN 'DROP' ELSE 'QUEUED' END, $1, w.seq, w.zone, lower($2), lower(w.recipient),
               w.domain,
               QUEUED_DETAILS || CASE WHEN w.suppressed THEN '{"reason": "suppressed"}'::jsonb ELSE '{}' END
          FROM wanted w, (SELECT $4::bigint AS body_size, $5::jsonb AS meta) AS m
         WHERE $14::boolean
    )
    INSERT INTO deliveries (id, seq, zone, recipient, domain, next_attempt)
    SELECT $1, seq, zone, recipient, domain, coalesce($12::timestamptz, now()) FROM wanted WHERE NOT suppressed
    RETURNING seq
""".replace("QUEUED_DETAILS", _QUEUED_DETAILS)

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


COMMIT_CHECK_TIME = 10.0  # seconds spent finding out, while the server comes back (default)


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
        self,
        pool: asyncpg.Pool,
        chunk_pool: asyncpg.Pool,
        message_id: str,
        group: GroupCommit | None = None,
        check_time: float = COMMIT_CHECK_TIME,
        log: bool = True,
    ) -> None:
        self._pool = pool
        self._log = log  # write the delivery log's entries with the rows
        self._check_time = check_time  # see commit()
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
            kept = await _committed_anyway(self._pool, message.id, self._check_time)
            if kept is None:
                raise
            log.warning("commit failed but went through", extra={"id": message.id, "error": repr(exc)})
            self._next_seq = 0
            return kept

    async def _commit(self, message: NewMessage, last_chunk: bytes | None) -> set[str]:
        if self._next_seq == 0:
            if self._group is not None:
                return await self._group.commit(message, last_chunk)
            return await _commit_one(self._pool, message, last_chunk, self._log)
        try:
            async with self._pool.acquire() as conn, conn.transaction():
                rows = await conn.fetch(_COMPLETE_ROWS, *_row_args(message, self._next_seq, last_chunk, self._log))
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


async def _committed_anyway(pool: asyncpg.Pool, message_id: str, check_time: float) -> set[str] | None:
    """The seqs of a message's deliveries if the message is queued (None if it is not, or
    if the server cannot say within ``check_time`` seconds)."""
    deadline = time.monotonic() + check_time
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


async def _commit_one(pool: asyncpg.Pool, message: NewMessage, last_chunk: bytes | None, log: bool) -> set[str]:
    """A message of one chunk; the seqs that got a delivery."""
    kept = await _insert_messages(pool, [(message, last_chunk)], log)
    return kept.get(message.id, set())


async def _insert_messages(
    pool: asyncpg.Pool, items: list[tuple[NewMessage, bytes | None]], log: bool
) -> dict[str, set[str]]:
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
        log,
    )
    kept: dict[str, set[str]] = {}
    for row in rows:
        kept.setdefault(row["id"], set()).add(row["seq"])
    unkept = [m.id for m in messages if m.id not in kept]
    if unkept:  # every recipient suppressed (rare)
        await pool.execute("DELETE FROM messages WHERE id = ANY($1::text[])", unkept)
    return kept


def _row_args(message: NewMessage, chunk_seq: int, last_chunk: bytes | None, log: bool) -> tuple[object, ...]:
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
        log,
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

    def __init__(self, pool: asyncpg.Pool, log: bool = True) -> None:
        self._pool = pool
        self._log = log
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
            _settle(waiting.done, await _commit_one(self._pool, waiting.message, waiting.last_chunk, self._log))
        except Exception as exc:  # handed to the caller
            if not waiting.done.done():
                waiting.done.set_exception(exc)

    async def _write_batch(self, batch: list[_Waiting]) -> dict[str, set[str]]:
        self.batches += 1
        return await _insert_messages(self._pool, [(w.message, w.last_chunk) for w in batch], self._log)


def _settle(done: asyncio.Future[set[str]], kept: set[str]) -> None:
    if not done.done():
        done.set_result(kept)


class IntakeStore(StoreBase):
    """The store's intake: one :class:`IntakeTransaction` per message received."""

    group_commit: GroupCommit
    commit_check_time: float
    log_enabled: bool

    def begin_intake(self, message_id: str) -> IntakeTransaction:
        return IntakeTransaction(
            self.pool, self.chunk_pool, message_id, self.group_commit, self.commit_check_time, self.log_enabled
        )
