"""Outcomes: delivery results applied in one transaction (a finished message goes with its
last delivery), and the attempt history that retry schedules are computed from."""

from __future__ import annotations

import uuid
from collections.abc import Sequence

from .base import StoreBase
from .records import AttemptHistory, DeliveryKey, OutcomeBatch


class OutcomeStore(StoreBase):
    async def apply_outcomes(self, batch: OutcomeBatch) -> set[DeliveryKey]:
        """Apply a batch of results in one transaction; return the deliveries it changed:
        a result applied before (a redelivered report) or too late changes none.

        Delivered rows go whatever their lease token (the mail *was* delivered); deferred
        and rejected rows change only while the reporter still holds the lease.
        """
        applied: set[DeliveryKey] = set()
        ids = sorted({d.id for d in batch.delivered} | {d.id for d in batch.deferred} | {d.id for d in batch.rejected})
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
                    [d.id for d in batch.delivered],
                    [d.seq for d in batch.delivered],
                )
                applied.update(DeliveryKey(r["id"], r["seq"]) for r in rows)
            if batch.rejected:
                rows = await conn.fetch(
                    "DELETE FROM deliveries d"
                    " USING unnest($1::text[], $2::text[], $3::uuid[]) AS r(id, seq, token)"
                    " WHERE d.id = r.id AND d.seq = r.seq AND d.lease_token = r.token"
                    " RETURNING d.id, d.seq",
                    [d.id for d in batch.rejected],
                    [d.seq for d in batch.rejected],
                    [uuid.UUID(d.token) for d in batch.rejected],
                )
                applied.update(DeliveryKey(r["id"], r["seq"]) for r in rows)
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
                    [d.id for d in batch.deferred],
                    [d.seq for d in batch.deferred],
                    [uuid.UUID(d.token) for d in batch.deferred],
                    [d.next_attempt for d in batch.deferred],
                    [d.response for d in batch.deferred],
                )
                applied.update(DeliveryKey(r["id"], r["seq"]) for r in rows)
            await conn.execute(
                "DELETE FROM messages m WHERE m.id = ANY($1::text[])"
                " AND NOT EXISTS (SELECT 1 FROM deliveries d WHERE d.id = m.id)",
                ids,
            )
        return applied

    async def delivery_attempts(self, keys: Sequence[DeliveryKey]) -> dict[DeliveryKey, AttemptHistory]:
        """How often, and since when, each delivery still in the queue has failed."""
        rows = await self.pool.fetch(
            "SELECT d.id, d.seq, d.attempts, d.created, d.last_deferred FROM deliveries d"
            " JOIN unnest($1::text[], $2::text[]) AS r(id, seq) ON d.id = r.id AND d.seq = r.seq",
            [k.id for k in keys],
            [k.seq for k in keys],
        )
        return {
            DeliveryKey(r["id"], r["seq"]): AttemptHistory(r["attempts"], r["created"], r["last_deferred"])
            for r in rows
        }
