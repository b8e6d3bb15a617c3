"""Reading messages: the message row with its first body chunks, and the body streamed."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Sequence

import asyncpg

from .base import StoreBase
from .records import StoredMessage


class BodyStore(StoreBase):
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
