"""Outcomes: delivery results applied in one transaction (a finished message goes with its
last delivery), and the attempt history that retry schedules are computed from."""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence

from .base import StoreBase
from .records import AttemptHistory, DeliveryKey, OutcomeBatch


def _logged(change: str, action: str, first: int) -> str:
    """``change`` (a DELETE or UPDATE of deliveries as ``d``), returning the rows it changed,
    with a delivery log entry ``action`` for each; parameters ``first`` to ``first + 3``: the
    ids, seqs and details of the entries, and whether to write them."""
    p = [f"${first + i}" for i in range(4)]
    return f"""
        WITH changed AS ({change} RETURNING d.id, d.seq, d.zone, d.recipient, d.domain),
        logged AS (
            INSERT INTO delivery_log (action, id, seq, zone, mail_from, recipient, domain, details)
            SELECT '{action}', c.id, c.seq, c.zone, lower(m.mail_from), lower(c.recipient), c.domain, l.details
              FROM changed c JOIN messages m ON m.id = c.id
              JOIN unnest({p[0]}::text[], {p[1]}::text[], {p[2]}::jsonb[]) AS l(id, seq, details)
                ON l.id = c.id AND l.seq = c.seq
             WHERE {p[3]}::boolean
        )
        SELECT id, seq FROM changed
    """  # noqa: S608 (the parts are this module's constants)


class OutcomeStore(StoreBase):
    log_enabled: bool

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
                    _logged(
                        "DELETE FROM deliveries d USING unnest($1::text[], $2::text[]) AS r(id, seq)"
                        " WHERE d.id = r.id AND d.seq = r.seq",
                        "ACCEPTED",
                        3,
                    ),
                    [d.id for d in batch.delivered],
                    [d.seq for d in batch.delivered],
                    *self._log_args(batch, batch.delivered),
                )
                applied.update(DeliveryKey(r["id"], r["seq"]) for r in rows)
            if batch.rejected:
                rows = await conn.fetch(
                    _logged(
                        "DELETE FROM deliveries d"
                        " USING unnest($1::text[], $2::text[], $3::uuid[]) AS r(id, seq, token)"
                        " WHERE d.id = r.id AND d.seq = r.seq AND d.lease_token = r.token",
                        "REJECTED",
                        4,
                    ),
                    [d.id for d in batch.rejected],
                    [d.seq for d in batch.rejected],
                    [uuid.UUID(d.token) for d in batch.rejected],
                    *self._log_args(batch, [DeliveryKey(d.id, d.seq) for d in batch.rejected]),
                )
                applied.update(DeliveryKey(r["id"], r["seq"]) for r in rows)
            if batch.deferred:
                rows = await conn.fetch(
                    _logged(
                        """
                        UPDATE deliveries d
                           SET next_attempt = r.next_attempt, attempts = d.attempts + 1,
                               first_deferred = coalesce(d.first_deferred, now()),
                               last_deferred = now(), last_response = r.response,
                               lease_token = NULL, lease_owner = NULL, lease_expires = NULL
                          FROM unnest($1::text[], $2::text[], $3::uuid[], $4::timestamptz[],
                                      $5::text[]) AS r(id, seq, token, next_attempt, response)
                         WHERE d.id = r.id AND d.seq = r.seq AND d.lease_token = r.token
                        """,
                        "DEFERRED",
                        6,
                    ),
                    [d.id for d in batch.deferred],
                    [d.seq for d in batch.deferred],
                    [uuid.UUID(d.token) for d in batch.deferred],
                    [d.next_attempt for d in batch.deferred],
                    [d.response for d in batch.deferred],
                    *self._log_args(batch, [DeliveryKey(d.id, d.seq) for d in batch.deferred]),
                )
                applied.update(DeliveryKey(r["id"], r["seq"]) for r in rows)
            await conn.execute(
                "DELETE FROM messages m WHERE m.id = ANY($1::text[])"
                " AND NOT EXISTS (SELECT 1 FROM deliveries d WHERE d.id = m.id)",
                ids,
            )
        return applied

    def _log_args(self, batch: OutcomeBatch, keys: Sequence[DeliveryKey]) -> tuple[object, ...]:
        """The log part's parameters: the keys again with each one's details, and whether to write."""
        details = [json.dumps(batch.details.get(k, {})) for k in keys] if self.log_enabled else []
        return [k.id for k in keys], [k.seq for k in keys], details, self.log_enabled

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
