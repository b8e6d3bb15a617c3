"""Leasing: ready deliveries handed to a sender for a while, renewed while it works on
them, given back when it will not finish them, and cleared when their time is up."""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable, Sequence

import asyncpg

from .base import StoreBase
from .records import DeliveryKey, Lease, LeaseCandidate, LeaseRef

# Picks which ready (id, seq, domain) candidates to lease: their positions in the list.
Admit = Callable[[list[LeaseCandidate]], Awaitable[list[int]]]


class LeaseStore(StoreBase):
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
                ready = [ready[i] for i in await admit([LeaseCandidate(r["id"], r["seq"], r["domain"]) for r in ready])]
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
        return [lease_from_row(r) for r in rows]

    async def release_expired_leases(self) -> int:
        """Clear leases whose time is up (leasing ignores them anyway; this keeps status honest)."""
        result = await self.pool.execute(
            "UPDATE deliveries SET lease_token = NULL, lease_owner = NULL, lease_expires = NULL"
            " WHERE lease_expires < now()"
        )
        return int(result.split()[-1])

    async def release_leases(self, leases: Sequence[LeaseRef]) -> int:
        """Give back leases a sender will not finish (it is stopping): the rows are ready
        again at once, with no attempt counted. A row whose lease has changed hands since
        is left alone. Returns the rows released."""
        if not leases:
            return 0
        result = await self.pool.execute(
            "UPDATE deliveries d SET lease_token = NULL, lease_owner = NULL, lease_expires = NULL"
            " FROM unnest($1::text[], $2::text[], $3::uuid[]) AS r(id, seq, token)"
            " WHERE d.id = r.id AND d.seq = r.seq AND d.lease_token = r.token",
            *_lease_arrays(leases),
        )
        return int(result.split()[-1])

    async def renew_leases(self, leases: Sequence[LeaseRef], lease_time: float) -> set[DeliveryKey]:
        """Extend leases a sender is still working on to ``lease_time`` seconds from now, so
        that a long delivery is not leased to another sender as well. A lease that has
        changed hands is left alone. Returns the deliveries renewed."""
        if not leases:
            return set()
        rows = await self.pool.fetch(
            "UPDATE deliveries d SET lease_expires = now() + make_interval(secs => $4)"
            " FROM unnest($1::text[], $2::text[], $3::uuid[]) AS r(id, seq, token)"
            " WHERE d.id = r.id AND d.seq = r.seq AND d.lease_token = r.token RETURNING d.id, d.seq",
            *_lease_arrays(leases),
            lease_time,
        )
        return {DeliveryKey(r["id"], r["seq"]) for r in rows}

    async def leased_recipient(self, message_id: str, seq: str, token: str) -> str | None:
        """The recipient of a delivery while ``token`` still holds its lease, else None."""
        recipient: str | None = await self.pool.fetchval(
            "SELECT recipient FROM deliveries WHERE id = $1 AND seq = $2 AND lease_token = $3",
            message_id,
            seq,
            uuid.UUID(token),
        )
        return recipient


def _lease_arrays(leases: Sequence[LeaseRef]) -> tuple[list[str], list[str], list[uuid.UUID]]:
    """The leases as the three arrays (id, seq, token) the lease statements unnest."""
    return [lease.id for lease in leases], [lease.seq for lease in leases], [uuid.UUID(lease.token) for lease in leases]


def lease_from_row(r: asyncpg.Record) -> Lease:
    """A lease as the lease statements return it (their RETURNING columns)."""
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
