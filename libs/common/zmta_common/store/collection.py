"""Garbage collection: messages that no delivery needs any more, and deliveries past their
zone's maximum age (leased to be reported rejected)."""

from __future__ import annotations

import uuid

from .base import StoreBase
from .leases import lease_from_row
from .records import Lease


class CollectionStore(StoreBase):
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
                      AND x.next_attempt <> 'infinity'  -- held by an operator: theirs to release
                    LIMIT $3 FOR UPDATE OF x SKIP LOCKED)
            RETURNING d.id, d.seq, d.recipient, d.domain, m.mail_from, d.attempts, d.lease_token, d.lease_expires
            """,
            zone,
            max_age,
            limit,
            token,
            owner,
        )
        return [lease_from_row(r) for r in rows]
